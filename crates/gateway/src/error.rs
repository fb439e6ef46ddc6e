//! One error type for clients: a stable code, an HTTP status, a human message. Internal
//! failures become `internal` / `unavailable` with a generic message; the detail is logged once,
//! here, on the server side.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat_events::LogError;
use chat_store::StoreError;
use tracing::error;

/// An outage fails every request that needs the dependency (3,000 sends queued behind a hung
/// broker fail together): one line per second tells it, with how many like it were not logged.
static OUTAGE_LOG: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(1));

/// At most one log line per period; counts the lines it held back.
struct LogThrottle {
    period: std::time::Duration,
    state: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl LogThrottle {
    const fn new(period: std::time::Duration) -> Self {
        LogThrottle { period, state: std::sync::Mutex::new(None) }
    }

    /// `Some(lines held back since the last one)` if a line may be logged at `now`.
    fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.as_mut() {
            Some((last, held)) if now.saturating_duration_since(*last) < self.period => {
                *held += 1;
                None
            }
            _ => {
                let held = state.map_or(0, |(_, h)| h);
                *state = Some((now, 0));
                Some(held)
            }
        }
    }
}

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
        if let Some(suppressed) = OUTAGE_LOG.admit(std::time::Instant::now()) {
            error!(context, error = %detail, suppressed, "dependency unavailable");
        }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::LogThrottle;

    #[test]
    fn an_outage_is_logged_once_per_period_with_a_count() {
        let t = LogThrottle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(t.admit(t0), Some(0));
        assert_eq!(t.admit(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.admit(t0 + Duration::from_millis(900)), None);
        assert_eq!(t.admit(t0 + Duration::from_millis(1_000)), Some(2), "the next line says how many were held back");
        assert_eq!(t.admit(t0 + Duration::from_millis(2_500)), Some(0));
    }
}
