//! Projection workers and the fan-out stage.
//!
//! - [`worker`]: the one consume → apply → store-offset loop ([`worker::run`]); offsets are
//!   stored only after every write of the records they cover succeeded.
//! - [`fanout`]: reads the conversations topic in order and appends one `delivery.queued` per
//!   recipient (and per receipt to a message's sender) to the per-recipient deliveries topic.
//! - [`views`]: every projection as a pure fold from an event and the rows it needs to table
//!   writes as data (history, inbox, receipts, streams, groups, people, analytics).
//! - [`projector`]: the projection stage: fetches the rows a slice of records needs, folds the
//!   records with [`views`] and applies the slice's writes at once.
//!
//! Life of a `message.sent` at offset 41 of conversations partition 3: the fan-out group reads
//! it and appends two `delivery.queued` (recipient, sender's other devices); the projection group
//! reads it, writes history/index/inbox/receipts, and stores offset 41 of partition 3; later it
//! reads each `delivery.queued` and writes the user-stream row whose seq is that record's offset.

pub mod fanout;
pub mod projector;
pub mod search;
pub mod views;
pub mod worker;

pub use fanout::FanOut;
pub use projector::Projector;
pub use worker::{run, DeadLetters, Handled, Handler, HandlerError, WorkerStats};
