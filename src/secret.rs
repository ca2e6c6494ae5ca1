//! Key material: [`Secret`] holds key bytes, keeps them out of `Debug` and
//! `Display`, and wipes them on drop; [`ct_eq`] compares MACs in constant
//! time; [`read_private`] reads a key or token file into a wiped buffer
//! after checking, as ssh does, that other users cannot read it.
//!
//! Which files hold secrets belongs to `config`, and the key-file syntax to
//! `spa::keyfile`; this module owns the bytes and the file-mode rule.

use std::fmt;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Key bytes that never show up in logs and are zeroed when dropped.
///
/// The bytes live in a boxed slice that is never resized, so no stale copy is
/// left behind by a reallocation.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Takes ownership of `bytes`, wiping the vector's whole buffer (spare
    /// capacity included) after copying it.
    pub fn new(mut bytes: Vec<u8>) -> Self {
        let secret = Self::from_slice(&bytes);
        // Vec::zeroize also clears the spare capacity, which
        // into_boxed_slice would have freed unwiped.
        bytes.zeroize();
        secret
    }

    /// Copies `bytes`; the caller still owns (and should wipe) the original.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }

    /// `len` fresh bytes from a cryptographic RNG.
    pub fn generate(len: usize, rng: &mut impl rand::CryptoRng) -> Self {
        let mut bytes = vec![0u8; len].into_boxed_slice();
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The key bytes. Named so that every use stands out in review.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Secret {}

/// Constant-time, so comparing a configured key with a candidate leaks
/// nothing but the length.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Compares two MACs (or any authenticators) in time that depends only on
/// their lengths, never on where they first differ.
///
/// Lengths are public (a MAC's length follows from its algorithm), so
/// slices of different lengths are simply unequal.
///
/// ```
/// use hmac::{Hmac, KeyInit, Mac};
/// use portcullis::secret::ct_eq;
/// use sha2::Sha256;
///
/// let mut mac = Hmac::<Sha256>::new_from_slice(b"hmac key").expect("hmac takes any key length");
/// mac.update(b"message");
/// let tag = mac.finalize().into_bytes();
///
/// let mut received = tag;
/// assert!(ct_eq(&tag, &received));
/// received[31] ^= 1;
/// assert!(!ct_eq(&tag, &received));
/// assert!(!ct_eq(&tag, &tag[..16]));
/// ```
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Lengths are public (tags have fixed sizes); contents are not: every
    // byte pair is folded in, with no early exit, and only the folded
    // difference meets a branch, through subtle's barrier (subtle's own
    // slice comparison puts a barrier on every byte).
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    diff.ct_eq(&0).into()
}

/// Largest key or token file read: key files are a few lines, and the cap
/// keeps a wrong path (a log, a device) from being read whole.
pub const MAX_PRIVATE_FILE_LEN: usize = 64 * 1024;

/// A key or token file's contents, wiped when dropped.
#[derive(Debug)]
pub struct PrivateFile {
    pub bytes: zeroize::Zeroizing<Vec<u8>>,
    /// Set when the file's group may read or write it: allowed (a group
    /// can be the intended reader, as with a Kubernetes `fsGroup`), but
    /// worth a warning.
    pub warning: Option<String>,
}

/// Why a key or token file was refused. Messages name the file and the fix
/// and never show its contents.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a regular file")]
    NotAFile { path: String },
    #[error("{path} is {access} other users (mode {mode:04o}): run `chmod 600 {path}`")]
    OpenToOthers {
        path: String,
        access: &'static str,
        mode: u32,
    },
    #[error("{path} is larger than {MAX_PRIVATE_FILE_LEN} bytes: not a key or token file")]
    TooLarge { path: String },
}

/// Refuses a file that users other than its owner and group may read or
/// write (any of the mode bits `0o007`), and warns when its group may
/// (`0o070`), as ssh refuses a private key other users can read.
///
/// ```
/// use portcullis::secret::check_mode;
/// use std::path::Path;
///
/// let path = Path::new("/etc/portcullis/alice.key");
/// assert_eq!(check_mode(path, 0o600).unwrap(), None);
/// assert!(check_mode(path, 0o640).unwrap().unwrap().contains("chmod 600 /etc/portcullis/alice.key"));
/// let refused = check_mode(path, 0o644).unwrap_err().to_string();
/// assert_eq!(
///     refused,
///     "/etc/portcullis/alice.key is readable by other users (mode 0644): run `chmod 600 /etc/portcullis/alice.key`"
/// );
/// ```
pub fn check_mode(path: &Path, mode: u32) -> Result<Option<String>, PrivateFileError> {
    let mode = mode & 0o7777;
    let access = |bits: u32| match (bits & 0o4 != 0, bits & 0o2 != 0) {
        (true, true) => "readable and writable by",
        (true, false) => "readable by",
        (false, true) => "writable by",
        (false, false) => "open to",
    };
    if mode & 0o007 != 0 {
        return Err(PrivateFileError::OpenToOthers {
            path: path.display().to_string(),
            access: access(mode & 0o007),
            mode,
        });
    }
    if mode & 0o070 != 0 {
        let path = path.display();
        return Ok(Some(format!(
            "{path} is {} its group (mode {mode:04o}): unless the group is meant to have it, run `chmod 600 {path}`",
            access((mode >> 3) & 0o7)
        )));
    }
    Ok(None)
}

/// [`check_mode`] on the file at `path` (following symbolic links, as
/// Kubernetes mounts secrets through them), for files another module reads.
pub fn check_private(path: &Path) -> Result<Option<String>, PrivateFileError> {
    let meta = std::fs::metadata(path).map_err(|source| PrivateFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    check_mode(path, meta.permissions().mode())
}

/// Reads a key or token file: refused unless it is a regular file of at
/// most [`MAX_PRIVATE_FILE_LEN`] bytes that passes [`check_mode`]. The mode
/// is checked on the opened file, so it is the file that is read. The bytes
/// land in one buffer allocated up front (never grown, so no copy is left
/// behind) and wiped when dropped.
pub fn read_private(path: &Path) -> Result<PrivateFile, PrivateFileError> {
    let shown = || path.display().to_string();
    let read_error = |source| PrivateFileError::Read { path: shown(), source };
    // Non-blocking, so a FIFO named by mistake is refused instead of
    // waiting for a writer; regular files ignore the flag.
    let mut file: File = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(PrivateFileError::NotAFile { path: shown() });
    }
    let warning = check_mode(path, meta.permissions().mode())?;
    let mut bytes = zeroize::Zeroizing::new(vec![0u8; MAX_PRIVATE_FILE_LEN + 1]);
    let mut len = 0;
    loop {
        let n = match file.read(&mut bytes[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        if n == 0 {
            break;
        }
        len += n;
        if len > MAX_PRIVATE_FILE_LEN {
            return Err(PrivateFileError::TooLarge { path: shown() });
        }
    }
    // Shrinks the length only: the capacity (wiped on drop) stays.
    bytes.truncate(len);
    Ok(PrivateFile { bytes, warning })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::from_slice(b"hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{secret}"), "Secret(<redacted>)");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(Secret(<redacted>))");
    }

    #[test]
    fn constructors_keep_the_bytes() {
        assert_eq!(Secret::new(b"abc".to_vec()).expose(), b"abc");
        assert_eq!(Secret::from(b"abc".to_vec()).expose(), b"abc");
        assert_eq!(Secret::from_slice(b"abc").len(), 3);
        assert!(Secret::from_slice(b"").is_empty());
        let mut rng = rand::rng();
        let a = Secret::generate(32, &mut rng);
        let b = Secret::generate(32, &mut rng);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(Secret::from_slice(b"k1"), Secret::from_slice(b"k1"));
        assert_ne!(Secret::from_slice(b"k1"), Secret::from_slice(b"k2"));
        assert_ne!(Secret::from_slice(b"k1"), Secret::from_slice(b"k10"));
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"tag", b"tag"));
        assert!(!ct_eq(b"tag", b"tab"));
        assert!(!ct_eq(b"tag", b"tags"));
    }

    fn write_with_mode(dir: &Path, name: &str, content: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn private_files_are_read_and_open_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let private = write_with_mode(dir.path(), "a.key", b"KEY: x\n", 0o600);
        let read = read_private(&private).unwrap();
        assert_eq!(&read.bytes[..], b"KEY: x\n");
        assert_eq!(read.warning, None);
        assert!(read_private(&write_with_mode(dir.path(), "r.key", b"k", 0o400))
            .unwrap()
            .warning
            .is_none());

        let group = write_with_mode(dir.path(), "g.key", b"k", 0o640);
        let warning = read_private(&group).unwrap().warning.unwrap();
        assert!(warning.contains("readable by its group (mode 0640)"), "{warning}");
        assert!(warning.contains(&format!("chmod 600 {}", group.display())), "{warning}");

        for (mode, access) in [
            (0o644, "readable by"),
            (0o604, "readable by"),
            (0o606, "readable and writable by"),
            (0o602, "writable by"),
            (0o601, "open to"),
        ] {
            let path = write_with_mode(dir.path(), &format!("o{mode:o}.key"), b"secret-bytes", mode);
            let err = read_private(&path).unwrap_err().to_string();
            let want = format!(
                "{} is {access} other users (mode {mode:04o}): run `chmod 600 {}`",
                path.display(),
                path.display()
            );
            assert_eq!(err, want);
            assert!(!err.contains("secret-bytes"));
            assert_eq!(check_private(&path).unwrap_err().to_string(), want);
        }
        assert!(check_private(&group).unwrap().is_some());
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_private(dir.path()).unwrap_err();
        assert!(matches!(err, PrivateFileError::NotAFile { .. }), "{err}");
        let missing = read_private(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(missing.starts_with("cannot read "), "{missing}");
        let big = write_with_mode(dir.path(), "big", &vec![b'a'; MAX_PRIVATE_FILE_LEN + 1], 0o600);
        assert!(matches!(read_private(&big), Err(PrivateFileError::TooLarge { .. })));
        let most = write_with_mode(dir.path(), "most", &vec![b'a'; MAX_PRIVATE_FILE_LEN], 0o600);
        assert_eq!(read_private(&most).unwrap().bytes.len(), MAX_PRIVATE_FILE_LEN);
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(read_private(&fifo), Err(PrivateFileError::NotAFile { .. })));
    }
}
