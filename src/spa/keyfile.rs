//! Key files: one small text format that holds a user's native key, their
//! fwknop keys, or both, so one file serves both formats.
//!
//! ```text
//! # comments and blank lines are ignored
//! PORTCULLIS_KEY_BASE64: <32 bytes, base64>
//! KEY_BASE64: <fwknop Rijndael key, base64>           # exactly as `fwknop --key-gen` prints
//! HMAC_KEY_BASE64: <fwknop HMAC key, base64>
//! HMAC_DIGEST_TYPE: sha512                            # optional: fwknop's default is sha256
//! ENCRYPTION_MODE: ctr                                # optional: fwknop's default is cbc
//! ```
//!
//! `NAME VALUE` (fwknop's `access.conf` and `.fwknoprc` spelling) works as
//! well as `NAME: VALUE`, and fwknop's passphrase forms `KEY` and `HMAC_KEY`
//! take the rest of the line as raw bytes. This module parses text and
//! renders it; reading the file (and checking its permissions) is the
//! caller's job. Errors name the line and never repeat what is on it.

use std::fmt;
use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::fwknop::{DigestType, EncryptionMode, FwknopKeys, NameError};
use super::native::NativeKey;
use super::KeyError;
use crate::secret::Secret;

pub const NATIVE_KEY: &str = "PORTCULLIS_KEY_BASE64";
pub const FWKNOP_KEY: &str = "KEY_BASE64";
pub const FWKNOP_HMAC_KEY: &str = "HMAC_KEY_BASE64";
pub const FWKNOP_PASSPHRASE: &str = "KEY";
pub const FWKNOP_HMAC_PASSPHRASE: &str = "HMAC_KEY";
pub const FWKNOP_HMAC_DIGEST: &str = "HMAC_DIGEST_TYPE";
pub const FWKNOP_MODE: &str = "ENCRYPTION_MODE";

/// Padding optional, like fwknop's own key decoding.
const KEY_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The keys one file holds; at least one of the two is present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub native: Option<NativeKey>,
    /// Set up with the file's `HMAC_DIGEST_TYPE` and `ENCRYPTION_MODE`, or
    /// fwknop's defaults (sha256, cbc).
    pub fwknop: Option<FwknopKeys>,
}

/// Why a key file was refused. Line numbers start at 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("line {line}: expected NAME: VALUE")]
    Syntax { line: usize },
    #[error(
        "line {line}: unknown setting (expected {NATIVE_KEY}, {FWKNOP_KEY}, {FWKNOP_HMAC_KEY}, \
         {FWKNOP_PASSPHRASE}, {FWKNOP_HMAC_PASSPHRASE}, {FWKNOP_HMAC_DIGEST} or {FWKNOP_MODE})"
    )]
    UnknownSetting { line: usize },
    #[error("line {line}: {name} is empty")]
    Empty { line: usize, name: &'static str },
    #[error("line {line}: {name} repeats the key set on line {first}")]
    Duplicate {
        line: usize,
        first: usize,
        name: &'static str,
    },
    #[error("line {line}: {name} is not valid base64")]
    Base64 { line: usize, name: &'static str },
    #[error("line {line}: {source}")]
    Key { line: usize, source: KeyError },
    #[error("line {line}: {FWKNOP_HMAC_KEY} without {FWKNOP_KEY}: an fwknop HMAC key needs its encryption key")]
    HmacWithoutKey { line: usize },
    #[error("no key found: expected {NATIVE_KEY}, or {FWKNOP_KEY} and {FWKNOP_HMAC_KEY}")]
    NoKey,
    /// Digest and mode names are not secret, so the message repeats them.
    #[error("line {line}: {source}")]
    Name { line: usize, source: NameError },
    #[error("line {line}: {name} without {FWKNOP_KEY}: it applies to fwknop keys only")]
    SettingWithoutKey { line: usize, name: &'static str },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setting {
    Native,
    Enc,
    Hmac,
}

/// Parses key-file text. Pure; never panics.
pub fn parse(text: &str) -> Result<KeyFile, KeyFileError> {
    let mut native: Option<(usize, NativeKey)> = None;
    let mut enc: Option<(usize, Secret)> = None;
    let mut hmac: Option<(usize, Secret)> = None;
    let mut digest: Option<(usize, DigestType)> = None;
    let mut mode: Option<(usize, EncryptionMode)> = None;

    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw_line.trim();
        // `[*]` lines are fwknop's notices: its first run prints "[*] Creating
        // initial rc file" to stdout, so `fwknop --key-gen > f` captures one.
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("[*]") {
            continue;
        }
        let split = trimmed
            .find(|c: char| c == ':' || c.is_whitespace())
            .ok_or(KeyFileError::Syntax { line })?;
        let (name, rest) = trimmed.split_at(split);
        let value = rest
            .strip_prefix(':')
            .unwrap_or(rest)
            .trim_start_matches(|c: char| c.is_whitespace())
            .trim_end();

        if name.eq_ignore_ascii_case(FWKNOP_HMAC_DIGEST) {
            let parsed = value.parse().map_err(|source| KeyFileError::Name { line, source })?;
            if let Some((first, _)) = digest.replace((line, parsed)) {
                return Err(KeyFileError::Duplicate {
                    line,
                    first,
                    name: FWKNOP_HMAC_DIGEST,
                });
            }
            continue;
        }
        if name.eq_ignore_ascii_case(FWKNOP_MODE) {
            let parsed = value.parse().map_err(|source| KeyFileError::Name { line, source })?;
            if let Some((first, _)) = mode.replace((line, parsed)) {
                return Err(KeyFileError::Duplicate {
                    line,
                    first,
                    name: FWKNOP_MODE,
                });
            }
            continue;
        }
        let (setting, name, bytes) = match_setting(name, value, line)?;
        let first = match setting {
            Setting::Native => native.as_ref().map(|(first, _)| *first),
            Setting::Enc => enc.as_ref().map(|(first, _)| *first),
            Setting::Hmac => hmac.as_ref().map(|(first, _)| *first),
        };
        if let Some(first) = first {
            return Err(KeyFileError::Duplicate { line, first, name });
        }
        match setting {
            Setting::Native => {
                let key = NativeKey::new(bytes).map_err(|source| KeyFileError::Key { line, source })?;
                native = Some((line, key));
            }
            Setting::Enc => enc = Some((line, bytes)),
            Setting::Hmac => hmac = Some((line, bytes)),
        }
    }

    if enc.is_none() {
        if let Some((line, _)) = digest {
            return Err(KeyFileError::SettingWithoutKey {
                line,
                name: FWKNOP_HMAC_DIGEST,
            });
        }
        if let Some((line, _)) = mode {
            return Err(KeyFileError::SettingWithoutKey {
                line,
                name: FWKNOP_MODE,
            });
        }
    }
    let fwknop = match (enc, hmac) {
        (None, None) => None,
        (None, Some((line, _))) => return Err(KeyFileError::HmacWithoutKey { line }),
        (Some((line, enc)), hmac) => {
            let line = hmac.as_ref().map_or(line, |(hmac_line, _)| *hmac_line);
            let keys =
                FwknopKeys::new(enc, hmac.map(|(_, key)| key)).map_err(|source| KeyFileError::Key { line, source })?;
            Some(keys.with(
                digest.map(|(_, d)| d).unwrap_or_default(),
                mode.map(|(_, m)| m).unwrap_or_default(),
            ))
        }
    };
    let native = native.map(|(_, key)| key);
    if native.is_none() && fwknop.is_none() {
        return Err(KeyFileError::NoKey);
    }
    Ok(KeyFile { native, fwknop })
}

fn match_setting(name: &str, value: &str, line: usize) -> Result<(Setting, &'static str, Secret), KeyFileError> {
    let known = [
        (NATIVE_KEY, Setting::Native, true),
        (FWKNOP_KEY, Setting::Enc, true),
        (FWKNOP_HMAC_KEY, Setting::Hmac, true),
        (FWKNOP_PASSPHRASE, Setting::Enc, false),
        (FWKNOP_HMAC_PASSPHRASE, Setting::Hmac, false),
    ];
    let (name, setting, base64) = known
        .into_iter()
        .find(|(known, _, _)| known.eq_ignore_ascii_case(name))
        .ok_or(KeyFileError::UnknownSetting { line })?;
    if value.is_empty() {
        return Err(KeyFileError::Empty { line, name });
    }
    let bytes = if base64 {
        let decoded = Zeroizing::new(KEY_B64.decode(value).map_err(|_| KeyFileError::Base64 { line, name })?);
        Secret::from_slice(&decoded)
    } else {
        Secret::from_slice(value.as_bytes())
    };
    Ok((setting, name, bytes))
}

/// Which keys `portcullis keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyKind {
    #[default]
    Native,
    /// The two lines `fwknop --key-gen` prints.
    Fwknop,
    /// One file for both formats.
    Both,
    /// The shared secret of a rotating knock sequence (see `crate::totp`).
    Totp,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Native => "native",
            KeyKind::Fwknop => "fwknop",
            KeyKind::Both => "both",
            KeyKind::Totp => "totp",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key kind {0:?}: use native, fwknop, both or totp")]
pub struct KeyKindError(String);

impl FromStr for KeyKind {
    type Err = KeyKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [KeyKind::Native, KeyKind::Fwknop, KeyKind::Both, KeyKind::Totp]
            .into_iter()
            .find(|kind| kind.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| KeyKindError(s.to_string()))
    }
}

/// Fresh keys of `kind`: a 32-byte native key; fwknop keys as
/// `fwknop --key-gen` makes them (32-byte Rijndael, 64-byte HMAC). A
/// rotating sequence's secret is no SPA key: see `crate::totp::render_key`.
pub fn generate(kind: KeyKind, rng: &mut impl rand::CryptoRng) -> KeyFile {
    let native = matches!(kind, KeyKind::Native | KeyKind::Both).then(|| NativeKey::generate(rng));
    let fwknop = matches!(kind, KeyKind::Fwknop | KeyKind::Both).then(|| FwknopKeys::generate(rng));
    KeyFile { native, fwknop }
}

/// The key-file text for `keys`, padded base64 like fwknop prints. The
/// fwknop part is exactly `fwknop --key-gen`'s output, so either tool's
/// file works with the other. Wiped when dropped.
pub fn render(keys: &KeyFile) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::new());
    let mut line = |name: &str, secret: &Secret| {
        let encoded = Zeroizing::new(STANDARD.encode(secret.expose()));
        text.push_str(name);
        text.push_str(": ");
        text.push_str(&encoded);
        text.push('\n');
    };
    if let Some(native) = &keys.native {
        line(NATIVE_KEY, native.secret());
    }
    if let Some(fwknop) = &keys.fwknop {
        line(FWKNOP_KEY, fwknop.enc());
        if let Some(hmac) = fwknop.hmac() {
            line(FWKNOP_HMAC_KEY, hmac);
        }
    }
    // Settings are written only where they differ from fwknop's defaults,
    // so `fwknop --key-gen` output renders back unchanged.
    if let Some(fwknop) = &keys.fwknop {
        if fwknop.hmac_digest() != DigestType::default() {
            text.push_str(&format!("{FWKNOP_HMAC_DIGEST}: {}\n", fwknop.hmac_digest()));
        }
        if fwknop.mode() != EncryptionMode::default() {
            text.push_str(&format!("{FWKNOP_MODE}: {}\n", fwknop.mode()));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Printed by `fwknop --key-gen` (Debian 2.6.10).
    const FWKNOP_KEYGEN: &str = "KEY_BASE64: GWn6QLFeR8Ce1tYl//zGRC5rYV2w9dJMz0yUcBOtTAc=\n\
        HMAC_KEY_BASE64: Wd73/Nyj3iMdI92SoJoZB/deL1Ktsy7lAfmx9cRlA+yicTgdjehaf+BUQN77RLO+7WfZG8wr/Mx5J8gk3Saj6g==\n";
    const NATIVE_LINE: &str = "PORTCULLIS_KEY_BASE64: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n";

    #[test]
    fn fwknop_keygen_output_parses_and_renders_back() {
        let file = parse(FWKNOP_KEYGEN).expect("parses");
        assert!(file.native.is_none());
        let keys = file.fwknop.as_ref().expect("fwknop keys");
        assert_eq!(keys.enc().len(), 32);
        assert_eq!(keys.hmac().map(Secret::len), Some(64));
        assert_eq!(render(&file).as_str(), FWKNOP_KEYGEN);
    }

    #[test]
    fn one_file_for_both_formats() {
        let text = format!("# alice\n\n{NATIVE_LINE}{FWKNOP_KEYGEN}");
        let file = parse(&text).expect("parses");
        let native = file.native.as_ref().expect("native key");
        assert_eq!(native.secret().expose(), (0u8..32).collect::<Vec<_>>());
        assert!(file.fwknop.is_some());
        assert_eq!(render(&file).as_str(), format!("{NATIVE_LINE}{FWKNOP_KEYGEN}"));
    }

    #[test]
    fn fwknop_spellings() {
        // access.conf style, no padding, lower case, passphrases.
        let text = "key_base64   GWn6QLFeR8Ce1tYl//zGRC5rYV2w9dJMz0yUcBOtTAc\n\
                    HMAC_KEY myhmackey1234567\n";
        let keys = parse(text).expect("parses").fwknop.expect("fwknop keys");
        assert_eq!(keys.hmac().map(Secret::expose), Some(&b"myhmackey1234567"[..]));
        let keys = parse("KEY: my secret: pass \n")
            .expect("parses")
            .fwknop
            .expect("fwknop keys");
        assert_eq!(keys.enc().expose(), b"my secret: pass");
        assert!(keys.hmac().is_none());
    }

    #[test]
    fn digest_type_and_mode_lines() {
        // access.conf spelling, any case.
        let text = format!("{FWKNOP_KEYGEN}HMAC_DIGEST_TYPE     SHA512\nencryption_mode: ctr\n");
        let file = parse(&text).expect("parses");
        let keys = file.fwknop.as_ref().expect("fwknop keys");
        assert_eq!(
            (keys.hmac_digest(), keys.mode()),
            (DigestType::Sha512, EncryptionMode::Ctr)
        );
        assert_eq!(
            render(&file).as_str(),
            format!("{FWKNOP_KEYGEN}HMAC_DIGEST_TYPE: sha512\nENCRYPTION_MODE: ctr\n")
        );
        assert_eq!(parse(&render(&file)).expect("renders parseable text"), file);
        let plain = parse(FWKNOP_KEYGEN).expect("parses");
        let keys = plain.fwknop.expect("fwknop keys");
        assert_eq!(
            (keys.hmac_digest(), keys.mode()),
            (DigestType::Sha256, EncryptionMode::Cbc)
        );

        let cases = [
            (
                format!("{FWKNOP_KEYGEN}ENCRYPTION_MODE legacy\n"),
                KeyFileError::Name {
                    line: 3,
                    source: NameError::Legacy,
                },
            ),
            (
                format!("{FWKNOP_KEYGEN}HMAC_DIGEST_TYPE sha224\n"),
                KeyFileError::Name {
                    line: 3,
                    source: NameError::Digest("sha224".into()),
                },
            ),
            (
                format!("{FWKNOP_KEYGEN}ENCRYPTION_MODE cbc\nENCRYPTION_MODE ctr\n"),
                KeyFileError::Duplicate {
                    line: 4,
                    first: 3,
                    name: FWKNOP_MODE,
                },
            ),
            (
                format!("{NATIVE_LINE}HMAC_DIGEST_TYPE md5\n"),
                KeyFileError::SettingWithoutKey {
                    line: 2,
                    name: FWKNOP_HMAC_DIGEST,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(&text), Err(want), "{text}");
        }
    }

    #[test]
    fn the_notice_of_a_first_fwknop_run_is_skipped() {
        let text = format!("[*] Creating initial rc file: /root/.fwknoprc.\n{FWKNOP_KEYGEN}");
        let keys = parse(&text).expect("fwknop --key-gen output with its first-run notice");
        assert!(keys.fwknop.is_some_and(|k| k.hmac().is_some()));
    }

    #[test]
    fn errors_name_the_line_and_hide_the_value() {
        let secretish = "c2VjcmV0c2VjcmV0c2VjcmV0";
        let cases: Vec<(String, KeyFileError)> = vec![
            (format!("\n{secretish}\n"), KeyFileError::Syntax { line: 2 }),
            (format!("FOO: {secretish}\n"), KeyFileError::UnknownSetting { line: 1 }),
            (
                "KEY_BASE64:\n".to_string(),
                KeyFileError::Empty {
                    line: 1,
                    name: FWKNOP_KEY,
                },
            ),
            (
                format!("KEY_BASE64: {secretish}!\n"),
                KeyFileError::Base64 {
                    line: 1,
                    name: FWKNOP_KEY,
                },
            ),
            (
                format!("{NATIVE_LINE}# x\n{NATIVE_LINE}"),
                KeyFileError::Duplicate {
                    line: 3,
                    first: 1,
                    name: NATIVE_KEY,
                },
            ),
            (
                format!("KEY: pass\nKEY_BASE64: {secretish}\n"),
                KeyFileError::Duplicate {
                    line: 2,
                    first: 1,
                    name: FWKNOP_KEY,
                },
            ),
            (
                format!("PORTCULLIS_KEY_BASE64: {secretish}\n"),
                KeyFileError::Key {
                    line: 1,
                    source: KeyError::Length {
                        what: "native key",
                        len: 18,
                        expected: "32",
                    },
                },
            ),
            (
                format!("HMAC_KEY_BASE64: {secretish}\n"),
                KeyFileError::HmacWithoutKey { line: 1 },
            ),
            (
                format!("KEY_BASE64: {secretish}\nHMAC_KEY_BASE64: {secretish}\n"),
                KeyFileError::Key {
                    line: 2,
                    source: KeyError::SameKeys,
                },
            ),
            ("# nothing\n".to_string(), KeyFileError::NoKey),
        ];
        for (text, want) in cases {
            let got = parse(&text).expect_err(&text);
            assert_eq!(got, want, "{text}");
            let message = got.to_string();
            assert!(!message.contains(secretish), "{message}");
            assert!(!message.contains("c2Vj"), "{message}");
        }
    }

    #[test]
    fn keygen_kinds() {
        let mut rng = rand::rng();
        let native = generate(KeyKind::Native, &mut rng);
        assert!(native.native.is_some() && native.fwknop.is_none());
        let text = render(&generate(KeyKind::Fwknop, &mut rng));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("KEY_BASE64: ") && lines[0].len() == 12 + 44,
            "{}",
            lines[0]
        );
        assert!(lines[1].starts_with("HMAC_KEY_BASE64: ") && lines[1].len() == 17 + 88);
        let both = generate(KeyKind::Both, &mut rng);
        assert_eq!(parse(&render(&both)).expect("renders parseable text"), both);
        assert_eq!("FWKNOP".parse(), Ok(KeyKind::Fwknop));
        assert!("gpg".parse::<KeyKind>().is_err());
        assert_eq!(KeyKind::default().to_string(), "native");
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = parse(&text);
        }

        #[test]
        fn near_valid_text_never_panics(
            name in prop::sample::select(vec![NATIVE_KEY, FWKNOP_KEY, FWKNOP_HMAC_KEY, "KEY", "HMAC_KEY", "X"]),
            sep in prop::sample::select(vec![":", " ", ": ", "\t", ""]),
            value in "[A-Za-z0-9+/= :\\t#]{0,120}",
        ) {
            let _ = parse(&format!("{name}{sep}{value}\n{FWKNOP_KEYGEN}"));
        }
    }
}
