//! TODO: idempotency
