//! Projection workers and the fan-out stage.
//!
//! - [`worker`]: the one consume → apply → store-offset loop ([`worker::run`]); offsets are
//!   stored only after every write of the records they cover succeeded.
//! - [`fanout`]: reads the conversations topic in order and appends one `delivery.queued` per
//!   recipient (and per receipt to a message's sender) to the per-recipient deliveries topic.
//! - [`projector`]: turns each event into idempotent table writes (history, inbox, pending,
//!   receipt timeline, user streams, last seen).
//!
//! Life of a `message.sent` at offset 41 of conversations partition 3: the fan-out group reads
//! it and appends two `delivery.queued` (recipient, sender's other devices); the projection group
//! reads it, writes history/index/inbox/receipts, and stores offset 41 of partition 3; later it
//! reads each `delivery.queued` and writes the user-stream row whose seq is that record's offset.

pub mod analytics;
pub mod fanout;
pub mod projector;
pub mod worker;

pub use fanout::FanOut;
pub use projector::Projector;
pub use worker::{run, Handler, HandlerError, WorkerStats};
