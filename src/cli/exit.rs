//! Every exit code of the `leasehold` command, in one table.
//!
//! Codes above 64 follow BSD's `sysexits.h` where one fits, so scripts that
//! already know them (75 "try again later", 69 "service unavailable") need
//! no table; a command run under `leasehold acquire` passes its own status
//! through.
//!
//! | code | constant | meaning |
//! |------|----------|---------|
//! | 0 | | done |
//! | 1 | [`FAILED`] | failed: the server refused the request, a bad file, no confirmation |
//! | 2 | | bad command line (clap) |
//! | 3 | [`NOT_FOUND`] | nothing matched: the resource is not held, or the revoke found another lease |
//! | 5 | [`AUTH`] | the admin credential was refused, or the admin API is disabled |
//! | 69 | [`UNREACHABLE`] | the coordinator cannot be reached (or is shutting down) |
//! | 71 | [`LOST`] | `acquire`: the lease was lost while COMMAND ran; COMMAND was stopped |
//! | 75 | [`BUSY`] | `acquire`: someone else held the resource for the whole `--wait` |
//! | 127 | [`CANNOT_RUN`] | `acquire`: COMMAND could not be started |

/// Failed: the server refused the request, a bad file, no confirmation.
pub const FAILED: i32 = 1;
/// Nothing matched: the resource is not held, or held under another token.
pub const NOT_FOUND: i32 = 3;
/// The admin credential was refused, or the admin API is disabled.
pub const AUTH: i32 = 5;
/// The coordinator cannot be reached, or is shutting down (`EX_UNAVAILABLE`).
pub const UNREACHABLE: i32 = 69;
/// The lease was lost while COMMAND ran; COMMAND was stopped (`EX_OSERR`).
pub const LOST: i32 = 71;
/// The resource was held by someone else for the whole wait (`EX_TEMPFAIL`).
pub const BUSY: i32 = 75;
/// COMMAND could not be started (as a shell says).
pub const CANNOT_RUN: i32 = 127;
