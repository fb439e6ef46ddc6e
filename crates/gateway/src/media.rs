//! Media: streamed uploads into an object store, authorized and range-capable downloads.
//!
//! - Upload: the body is streamed into a multipart upload (memory per upload is one part,
//!   5 MiB, never the whole file), hashed (SHA-256) on the way, cut off with 413 as soon as it
//!   passes the kind's limit, and its content type is detected from its first bytes (the
//!   client's header is not trusted) and must fit the declared kind. Only once the object is
//!   stored are its command-side row and the `media.uploaded` event written.
//! - Download: the uploader, members of a conversation it was sent in, and, for an avatar,
//!   whom its owner's photo setting admits; everyone else gets the same 404 as for an id that
//!   does not exist. Single byte
//!   ranges (`Range: bytes=a-b`, `a-`, `-n`) get 206 (video seeking); a bad range gets 416.
//!
//! Objects live under `media/<media id>`: the local filesystem in embedded mode, an
//! S3-compatible bucket in cluster mode (both through `object_store`).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chat_events::{ConversationId, Envelope, Event, EventId, MediaUploaded, MessageKind, UserId};
use chat_store::MediaObject;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::error::ApiError;
use crate::service::Chat;

/// Upload limits per kind, in bytes.
#[derive(Clone, Debug)]
pub struct MediaLimits {
    pub image: u64,
    pub audio: u64,
    pub video: u64,
}

impl Default for MediaLimits {
    fn default() -> Self {
        MediaLimits { image: 16 << 20, audio: 16 << 20, video: 100 << 20 }
    }
}

impl MediaLimits {
    fn of(&self, kind: MessageKind) -> u64 {
        match kind {
            MessageKind::Image => self.image,
            MessageKind::Audio => self.audio,
            MessageKind::Video => self.video,
            MessageKind::Text => 0,
        }
    }
}

/// Where media objects go.
#[derive(Clone)]
pub struct MediaStorage {
    pub store: Arc<dyn ObjectStore>,
    pub limits: MediaLimits,
}

/// What an upload answers.
#[derive(Debug, Serialize)]
pub struct Uploaded {
    pub media_id: uuid::Uuid,
    pub kind: MessageKind,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

/// Bytes needed to recognise a type.
const SNIFF: usize = 8 * 1024;
/// Parts of a multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

fn object_path(id: uuid::Uuid) -> ObjectPath {
    ObjectPath::from(format!("media/{id}"))
}

fn category(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Image => "image/",
        MessageKind::Audio => "audio/",
        MessageKind::Video => "video/",
        MessageKind::Text => "-",
    }
}

/// The content type of some leading bytes, if it fits `kind`.
pub fn detect(kind: MessageKind, head: &[u8]) -> Option<String> {
    let t = infer::get(head)?;
    let mime = t.mime_type();
    // An MP4 container holding only audio is reported as video/mp4 by signature; accept it as
    // audio too (m4a files are MP4 containers).
    let fits = mime.starts_with(category(kind)) || (kind == MessageKind::Audio && mime == "video/mp4");
    fits.then(|| mime.to_owned())
}

/// A file extension for a stored content type (for the download's file name).
fn extension(content_type: &str) -> &str {
    let sub = content_type.split_once('/').map_or("", |(_, s)| s);
    let sub = sub.strip_prefix("x-").unwrap_or(sub);
    match sub {
        "jpeg" => "jpg",
        "mpeg" if content_type.starts_with("audio/") => "mp3",
        "quicktime" => "mov",
        s if !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_alphanumeric()) => s,
        _ => "bin",
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "media_too_large", format!("this kind of media is at most {limit} bytes"))
}

fn unsupported() -> ApiError {
    ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media", "the bytes are not a supported file of the declared kind")
}

impl Chat {
    fn media_storage(&self) -> Result<&MediaStorage, ApiError> {
        self.media.as_ref().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "media_unavailable", "media storage is not configured"))
    }

    /// Streams an upload into the object store.
    pub async fn upload(&self, uploader: UserId, kind: &str, body: Body) -> Result<Uploaded, ApiError> {
        let kind = match MessageKind::parse(kind) {
            Some(k) if k != MessageKind::Text => k,
            _ => return Err(ApiError::bad_request("invalid_kind", "kind is image, audio or video")),
        };
        let storage = self.media_storage()?;
        let limit = storage.limits.of(kind);
        let media_id = uuid::Uuid::new_v4();
        let path = object_path(media_id);
        let upload = storage.store.put_multipart(&path).await.map_err(|e| ApiError::unavailable("media store", &e))?;
        let mut writer = WriteMultipart::new(upload);
        let mut hash = Sha256::new();
        let mut head: Vec<u8> = Vec::with_capacity(SNIFF);
        let mut content_type: Option<String> = None;
        let mut size: u64 = 0;
        let mut stream = body.into_data_stream();
        let outcome: Result<(), ApiError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    if crate::http::body_timed_out(&e) {
                        crate::http::body_timeout()
                    } else {
                        ApiError::bad_request("upload_interrupted", "the upload ended early")
                    }
                })?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(too_large(limit));
                }
                if content_type.is_none() && head.len() < SNIFF {
                    let take = (SNIFF - head.len()).min(chunk.len());
                    head.extend_from_slice(&chunk[..take]);
                    if head.len() >= SNIFF {
                        // Refuse early, before the rest is stored.
                        content_type = Some(detect(kind, &head).ok_or_else(unsupported)?);
                    }
                }
                hash.update(&chunk);
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| ApiError::unavailable("media store", &e))?;
                writer.write(&chunk);
            }
            if size == 0 {
                return Err(ApiError::bad_request("empty_upload", "the upload has no bytes"));
            }
            if content_type.is_none() {
                content_type = Some(detect(kind, &head).ok_or_else(unsupported)?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            if let Err(ae) = writer.abort().await {
                warn!(error = %ae, "aborting a refused upload failed");
            }
            return Err(e);
        }
        writer.finish().await.map_err(|e| ApiError::unavailable("media store", &e))?;
        let sha256 = hex::encode(hash.finalize());
        let content_type = content_type.unwrap_or_default();
        let object = MediaObject {
            media_id,
            uploader,
            kind: kind.as_str().to_owned(),
            content_type: content_type.clone(),
            size: size as i64,
            sha256: sha256.clone(),
            created_at: chat_events::now_millis(),
            public: false,
        };
        let recorded = async {
            self.store.put_media(&object).await?;
            let event = MediaUploaded { media_id, uploader, kind, content_type: content_type.clone(), size, sha256: sha256.clone() };
            let env = Envelope::new(EventId::new_v7(), Some(uploader), Event::MediaUploaded(event));
            chat_events::append_event(self.log.as_ref(), &self.topics, &env).await.map_err(ApiError::from)?;
            Ok::<(), ApiError>(())
        }
        .await;
        if let Err(e) = recorded {
            // No record, no object: nothing half-done stays behind.
            if let Err(de) = storage.store.delete(&path).await {
                warn!(error = %de, %media_id, "removing an unrecorded upload failed");
            }
            return Err(e);
        }
        Ok(Uploaded { media_id, kind, content_type, size, sha256 })
    }

    /// Whether `user` may read a media object: its uploader; anyone, for a public one (an
    /// avatar); a member of a direct conversation it was sent in; in a group, whoever may read a
    /// message that carries it (a member at the message's position, the history rule), or, while
    /// none of its messages there is projected yet (it was just sent), an active member.
    async fn may_read(&self, user: UserId, m: &MediaObject) -> Result<bool, ApiError> {
        if m.uploader == user {
            return Ok(true);
        }
        // An avatar: for whom its owner's photo setting admits (it may also have been sent in a
        // conversation, which the rules below answer for).
        if m.public && self.shown(m.uploader, user, crate::privacy::Shown::Photo).await? {
            return Ok(true);
        }
        for conv in self.store.media_shares(m.media_id).await? {
            let readable = if conv.is_group() {
                let positions = self.store.media_positions(m.media_id, &conv).await?;
                if positions.is_empty() {
                    self.store.group_member(&conv, user).await?.is_some_and(|r| r.active)
                } else {
                    let intervals = self.store.user_group_intervals(user, &conv).await?;
                    positions.iter().any(|p| intervals.iter().any(|(since, until)| since < p && until.is_none_or(|u| *p < u)))
                }
            } else {
                conv.has_member(user)
            };
            if readable {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A media object the sender may attach to a message of `kind` in `conv`: their own upload,
    /// or one they can read (forwarding).
    pub(crate) async fn attachable(&self, sender: UserId, media_id: &str, kind: MessageKind) -> Result<MediaObject, ApiError> {
        let unknown = || ApiError::bad_request("unknown_media", "no such media");
        let id: uuid::Uuid = media_id.parse().map_err(|_| unknown())?;
        let m = self.store.media(id).await?.ok_or_else(unknown)?;
        if !self.may_read(sender, &m).await? {
            return Err(unknown());
        }
        if m.kind != kind.as_str() {
            return Err(ApiError::bad_request("media_kind_mismatch", format!("that media is {}, not {}", m.kind, kind.as_str())));
        }
        Ok(m)
    }

    /// Records that a media object was sent in a conversation (before the message's append).
    pub(crate) async fn share(&self, media: uuid::Uuid, conv: &ConversationId) -> Result<(), ApiError> {
        Ok(self.store.share_media(media, conv).await?)
    }

    /// A media object as an HTTP response, honouring a single byte range.
    pub async fn download(&self, user: UserId, media_id: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
        let id: uuid::Uuid = media_id.parse().map_err(|_| ApiError::not_found())?;
        let m = self.store.media(id).await?.ok_or_else(ApiError::not_found)?;
        if !self.may_read(user, &m).await? {
            return Err(ApiError::not_found());
        }
        let storage = self.media_storage()?;
        let size = m.size.max(0) as u64;
        let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            None => None,
            Some(r) => match parse_range(r, size) {
                Ok(r) => r,
                Err(Unsatisfiable) => {
                    return Ok((
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                    )
                        .into_response())
                }
            },
        };
        let opts = GetOptions { range: range.clone().map(GetRange::Bounded), ..Default::default() };
        let result = storage.store.get_opts(&object_path(id), opts).await.map_err(|e| ApiError::unavailable("media store", &e))?;
        let body = Body::from_stream(result.into_stream());
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(&m.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
        // A stored file is data, never a page: no type sniffing (a GIF/HTML polyglot stays a
        // GIF), nothing of it runs if a browser opens it anyway, and it has a file name.
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; img-src 'self'; media-src 'self'; sandbox"));
        if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{id}.{}\"", extension(&m.content_type))) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", m.sha256)) {
            h.insert(header::ETAG, v);
        }
        Ok(match range {
            Some(r) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end - 1)) {
                    h.insert(header::CONTENT_RANGE, v);
                }
                (StatusCode::PARTIAL_CONTENT, h, body).into_response()
            }
            None => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
                (StatusCode::OK, h, body).into_response()
            }
        })
    }
}

/// A `Range` header that cannot be served (answered 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A single `bytes=` range as a half-open range within `size`; `Ok(None)` for forms we serve
/// whole (several ranges, other units), `Err` if unsatisfiable.
pub fn parse_range(v: &str, size: u64) -> Result<Option<std::ops::Range<u64>>, Unsatisfiable> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.is_empty(), b.is_empty()) {
        (false, _) => {
            let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
            let end = if b.is_empty() { size } else { b.parse::<u64>().map_err(|_| Unsatisfiable)?.saturating_add(1).min(size) };
            start..end
        }
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
            size.saturating_sub(n)..size
        }
        (true, true) => return Err(Unsatisfiable),
    };
    if range.start >= range.end || range.start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some(0..10)));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some(90..100)));
        assert_eq!(parse_range("bytes=-5", 100), Ok(Some(95..100)));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some(50..100)));
        assert_eq!(parse_range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=9-3", 100), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 100), Err(Unsatisfiable));
    }

    #[test]
    fn types_come_from_the_bytes() {
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 0x0D, b'I', b'H', b'D', b'R'];
        assert_eq!(detect(MessageKind::Image, &png).as_deref(), Some("image/png"));
        assert_eq!(detect(MessageKind::Video, &png), None, "a PNG is not a video");
        assert_eq!(detect(MessageKind::Image, b"just some text pretending"), None);
    }
}
