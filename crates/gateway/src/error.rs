//! One error type for clients: a stable code, an HTTP status, a human message. Internal
//! failures become `internal` / `unavailable` with a generic message; the detail is logged once,
//! here, on the server side.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat_events::LogError;
use chat_store::StoreError;
use tracing::error;

/// An error a client sees (HTTP body or WebSocket error frame).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, documented in `docs/protocol.md`.
    pub code: &'static str,
    pub message: String,
    /// For `rate_limited`: how long until the attempt may succeed (HTTP: `retry_after` seconds
    /// in the body and a `Retry-After` header; WebSocket: `retry_after_ms` in the error frame).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The one answer for "does not exist" and "exists but is not yours": the two must look
    /// the same, or the difference leaks who talks to whom.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
    }

    /// A dependency failed; logged here with its detail, generic for the client.
    pub fn unavailable(context: &str, detail: &dyn std::fmt::Display) -> Self {
        error!(context, error = %detail, "dependency unavailable");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the service is temporarily unavailable, retry later")
    }

    /// A bug or corrupt data; logged here with its detail, generic for the client.
    pub fn internal(context: &str, detail: &dyn std::fmt::Display) -> Self {
        error!(context, error = %detail, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }

    /// Too many attempts of something limited (log-ins, registrations): try again after
    /// `retry_after` seconds.
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        e.retry_after = Some(retry_after);
        e
    }

    pub fn overloaded() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "the server is overloaded, retry later")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Lost(_) => ApiError::unavailable("store", &e),
            StoreError::Data(_) => ApiError::internal("store", &e),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::QueueFull => ApiError::overloaded(),
            LogError::Unavailable(_) => ApiError::unavailable("event log", &e),
            LogError::Fatal(_) => ApiError::internal("event log", &e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        match self.retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64) {
            Some(secs) => {
                body["error"]["retry_after"] = serde_json::json!(secs);
                (self.status, [(axum::http::header::RETRY_AFTER, secs.to_string())], Json(body)).into_response()
            }
            None => (self.status, Json(body)).into_response(),
        }
    }
}
