//! TODO: guard
