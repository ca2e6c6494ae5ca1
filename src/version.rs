//! What this build is: the crate version, the git commit it was built from
//! (`build.rs`; "unknown" outside a git checkout) and the build profile.
//! `--version`, the start-up line and `portcullis_build_info` say the same.

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The short commit hash, with `-dirty` when tracked files differed from
/// it at build time; `unknown` when built without git.
pub const COMMIT: &str = env!("PORTCULLIS_GIT_COMMIT");

/// `debug` or `release` (the dist profile inherits release).
pub const PROFILE: &str = env!("PORTCULLIS_BUILD_PROFILE");

/// `--version`'s text after the program name.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PORTCULLIS_GIT_COMMIT"),
    ", ",
    env!("PORTCULLIS_BUILD_PROFILE"),
    ")"
);
