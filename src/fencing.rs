//! TODO: fencing
