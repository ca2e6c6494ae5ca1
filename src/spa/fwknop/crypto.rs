//! fwknop's algorithms: the digest types (for the HMAC and for the inner
//! message digest), the Rijndael modes the client's `-M` selects, and
//! OpenSSL's `EVP_BytesToKey` key derivation that every mode shares.
//!
//! Owns the primitives only; the packet layout and the order of checks
//! belong to the parent module.

use std::fmt;
use std::str::FromStr;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{
    Array, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, KeyInit, KeyIvInit,
};
use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384, Sha512};
use sha3::{Sha3_256, Sha3_512};
use zeroize::Zeroizing;

use crate::secret::Secret;

const BLOCK: usize = 16;

/// A hash fwknop offers, for the HMAC (`--hmac-digest-type`,
/// `HMAC_DIGEST_TYPE`) and for the inner message digest (`-m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DigestType {
    Md5,
    Sha1,
    /// fwknop's default for both uses.
    #[default]
    Sha256,
    Sha384,
    Sha512,
    Sha3_256,
    Sha3_512,
}

impl DigestType {
    pub const ALL: [DigestType; 7] = [
        DigestType::Md5,
        DigestType::Sha1,
        DigestType::Sha256,
        DigestType::Sha384,
        DigestType::Sha512,
        DigestType::Sha3_256,
        DigestType::Sha3_512,
    ];

    /// fwknop's spelling (`sha3_256`), also the config value.
    pub fn as_str(self) -> &'static str {
        match self {
            DigestType::Md5 => "md5",
            DigestType::Sha1 => "sha1",
            DigestType::Sha256 => "sha256",
            DigestType::Sha384 => "sha384",
            DigestType::Sha512 => "sha512",
            DigestType::Sha3_256 => "sha3_256",
            DigestType::Sha3_512 => "sha3_512",
        }
    }

    /// Raw output length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            DigestType::Md5 => 16,
            DigestType::Sha1 => 20,
            DigestType::Sha256 | DigestType::Sha3_256 => 32,
            DigestType::Sha384 => 48,
            DigestType::Sha512 | DigestType::Sha3_512 => 64,
        }
    }

    /// Length of the output as unpadded base64, as it appears on the wire.
    pub fn b64_len(self) -> usize {
        (self.output_len() * 4).div_ceil(3)
    }

    /// The digest of `parts` concatenated.
    pub(super) fn hash(self, parts: &[&[u8]]) -> DigestBytes {
        fn run<D: Digest>(parts: &[&[u8]]) -> DigestBytes {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            DigestBytes::from_slice(&d.finalize())
        }
        match self {
            DigestType::Md5 => run::<Md5>(parts),
            DigestType::Sha1 => run::<Sha1>(parts),
            DigestType::Sha256 => run::<Sha256>(parts),
            DigestType::Sha384 => run::<Sha384>(parts),
            DigestType::Sha512 => run::<Sha512>(parts),
            DigestType::Sha3_256 => run::<Sha3_256>(parts),
            DigestType::Sha3_512 => run::<Sha3_512>(parts),
        }
    }
}

impl fmt::Display for DigestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A digest or mode name that is not one of fwknop's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a digest type: use md5, sha1, sha256, sha384, sha512, sha3_256 or sha3_512")]
    Digest(String),
    #[error("{0:?} is not an encryption mode: use cbc, ctr, cfb, ofb or ecb")]
    Mode(String),
    /// fwknop's `legacy` mode (pre-2.5 clients) truncates and pads keys
    /// to 16 bytes: weak keys are not carried over.
    #[error(
        "encryption mode \"legacy\" (pre-2.5 fwknop clients, keys cut to 16 bytes) is refused: \
         upgrade the client and use cbc"
    )]
    Legacy,
}

impl FromStr for DigestType {
    type Err = NameError;

    /// fwknop's names, any case; `sha3-256` works as well as `sha3_256`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().replace('-', "_");
        DigestType::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(&norm))
            .ok_or_else(|| NameError::Digest(s.to_string()))
    }
}

/// The Rijndael (AES-256) mode: client `-M`, fwknopd `ENCRYPTION_MODE`.
/// Every mode pads with PKCS#7 to whole blocks and takes its key and IV
/// from the same KDF (`lib/rijndael.c: block_encrypt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EncryptionMode {
    #[default]
    Cbc,
    /// A 128-bit big-endian counter starting at the IV.
    Ctr,
    /// 128-bit cipher feedback.
    Cfb,
    /// 128-bit output feedback.
    Ofb,
    /// No IV; equal blocks encrypt equally. Offered because fwknop does.
    Ecb,
}

impl EncryptionMode {
    pub const ALL: [EncryptionMode; 5] = [
        EncryptionMode::Cbc,
        EncryptionMode::Ctr,
        EncryptionMode::Cfb,
        EncryptionMode::Ofb,
        EncryptionMode::Ecb,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionMode::Cbc => "cbc",
            EncryptionMode::Ctr => "ctr",
            EncryptionMode::Cfb => "cfb",
            EncryptionMode::Ofb => "ofb",
            EncryptionMode::Ecb => "ecb",
        }
    }
}

impl fmt::Display for EncryptionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EncryptionMode {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("legacy") {
            return Err(NameError::Legacy);
        }
        EncryptionMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| NameError::Mode(s.to_string()))
    }
}

/// A digest's raw bytes, up to SHA-512's 64, without allocating.
#[derive(Clone, Copy)]
pub(super) struct DigestBytes {
    buf: [u8; 64],
    len: usize,
}

impl DigestBytes {
    fn from_slice(bytes: &[u8]) -> Self {
        let mut buf = [0u8; 64];
        buf[..bytes.len()].copy_from_slice(bytes);
        Self { buf, len: bytes.len() }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// An HMAC key with its inner and outer pads already hashed, so that each
/// packet costs only its own blocks.
#[derive(Clone)]
pub(super) enum KeyedMac {
    Md5(Hmac<Md5>),
    Sha1(Hmac<Sha1>),
    Sha256(Hmac<Sha256>),
    Sha384(Hmac<Sha384>),
    Sha512(Hmac<Sha512>),
    Sha3_256(Hmac<Sha3_256>),
    Sha3_512(Hmac<Sha3_512>),
}

impl KeyedMac {
    pub(super) fn new(digest: DigestType, key: &Secret) -> Self {
        fn keyed<M: KeyInit>(key: &Secret) -> M {
            <M as KeyInit>::new_from_slice(key.expose()).expect("HMAC accepts keys of any length")
        }
        match digest {
            DigestType::Md5 => KeyedMac::Md5(keyed(key)),
            DigestType::Sha1 => KeyedMac::Sha1(keyed(key)),
            DigestType::Sha256 => KeyedMac::Sha256(keyed(key)),
            DigestType::Sha384 => KeyedMac::Sha384(keyed(key)),
            DigestType::Sha512 => KeyedMac::Sha512(keyed(key)),
            DigestType::Sha3_256 => KeyedMac::Sha3_256(keyed(key)),
            DigestType::Sha3_512 => KeyedMac::Sha3_512(keyed(key)),
        }
    }

    /// The tag over `prefix` then `body`.
    pub(super) fn tag(&self, prefix: &[u8], body: &[u8]) -> DigestBytes {
        fn run<M: Mac + Clone>(keyed: &M, prefix: &[u8], body: &[u8]) -> DigestBytes {
            let mut mac = keyed.clone();
            mac.update(prefix);
            mac.update(body);
            DigestBytes::from_slice(&mac.finalize().into_bytes())
        }
        match self {
            KeyedMac::Md5(m) => run(m, prefix, body),
            KeyedMac::Sha1(m) => run(m, prefix, body),
            KeyedMac::Sha256(m) => run(m, prefix, body),
            KeyedMac::Sha384(m) => run(m, prefix, body),
            KeyedMac::Sha512(m) => run(m, prefix, body),
            KeyedMac::Sha3_256(m) => run(m, prefix, body),
            KeyedMac::Sha3_512(m) => run(m, prefix, body),
        }
    }
}

/// OpenSSL's `EVP_BytesToKey` with MD5 and one round: `D1 = MD5(pass‖salt)`,
/// `Di = MD5(Di-1‖pass‖salt)`; the first 32 bytes are the AES-256 key, the
/// next 16 the IV.
pub(super) fn evp_bytes_to_key(pass: &Secret, salt: &[u8; 8]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 16]>) {
    let mut out = Zeroizing::new([0u8; 48]);
    let mut prev: Option<Zeroizing<[u8; 16]>> = None;
    for chunk in out.chunks_exact_mut(16) {
        let mut md5 = Md5::new();
        if let Some(prev) = &prev {
            md5.update(prev.as_slice());
        }
        md5.update(pass.expose());
        md5.update(salt);
        let block = Zeroizing::new(<[u8; 16]>::from(md5.finalize()));
        chunk.copy_from_slice(block.as_slice());
        prev = Some(block);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    let mut iv = Zeroizing::new([0u8; 16]);
    key.copy_from_slice(&out[..32]);
    iv.copy_from_slice(&out[32..]);
    (key, iv)
}

/// `plaintext` padded with PKCS#7 (always 1 to 16 bytes) and encrypted.
pub(super) fn encrypt(mode: EncryptionMode, key: &[u8; 32], iv: &[u8; 16], plaintext: &[u8]) -> Vec<u8> {
    let pad = BLOCK - plaintext.len() % BLOCK;
    let mut buf = Vec::with_capacity(plaintext.len() + pad);
    buf.extend_from_slice(plaintext);
    if mode == EncryptionMode::Cbc {
        buf.resize(plaintext.len() + pad, 0);
        let n = cbc::Encryptor::<aes::Aes256>::new(key.into(), iv.into())
            .encrypt_padded::<Pkcs7>(&mut buf, plaintext.len())
            .expect("the buffer has room for the padding")
            .len();
        debug_assert_eq!(n, buf.len());
        return buf;
    }
    buf.resize(plaintext.len() + pad, u8::try_from(pad).expect("pad is at most 16"));
    let aes = aes::Aes256::new(key.into());
    let (blocks, rest) = Array::slice_as_chunks_mut(&mut buf);
    debug_assert!(rest.is_empty());
    match mode {
        EncryptionMode::Cbc => unreachable!("handled above"),
        EncryptionMode::Ecb => aes.encrypt_blocks(blocks),
        EncryptionMode::Cfb => {
            let mut feedback = Array::from(*iv);
            for b in blocks {
                aes.encrypt_block(&mut feedback);
                xor(b, &feedback);
                feedback = *b;
            }
        }
        EncryptionMode::Ofb | EncryptionMode::Ctr => keystream(mode, &aes, iv, blocks),
    }
    buf
}

/// Decrypts `ciphertext` (whole blocks) and strips its PKCS#7 padding;
/// `None` when the padding is not well formed (usually a wrong key).
pub(super) fn decrypt<'c>(
    mode: EncryptionMode,
    key: &[u8; 32],
    iv: &[u8; 16],
    ciphertext: &'c mut [u8],
) -> Option<&'c [u8]> {
    if ciphertext.is_empty() || ciphertext.len() % BLOCK != 0 {
        return None;
    }
    if mode == EncryptionMode::Cbc {
        return cbc::Decryptor::<aes::Aes256>::new(key.into(), iv.into())
            .decrypt_padded::<Pkcs7>(ciphertext)
            .ok()
            .map(|p| p as &[u8]);
    }
    let aes = aes::Aes256::new(key.into());
    {
        let (blocks, _) = Array::slice_as_chunks_mut(ciphertext);
        match mode {
            EncryptionMode::Cbc => unreachable!("handled above"),
            EncryptionMode::Ecb => aes.decrypt_blocks(blocks),
            EncryptionMode::Cfb => {
                // The keystream is the encryption of the previous
                // ciphertext block: all known up front.
                let mut stream: Vec<aes::Block> = Vec::with_capacity(blocks.len());
                stream.push(Array::from(*iv));
                stream.extend_from_slice(&blocks[..blocks.len() - 1]);
                aes.encrypt_blocks(&mut stream);
                for (b, s) in blocks.iter_mut().zip(&stream) {
                    xor(b, s);
                }
            }
            EncryptionMode::Ofb | EncryptionMode::Ctr => keystream(mode, &aes, iv, blocks),
        }
    }
    unpad(ciphertext)
}

/// XORs OFB's or CTR's keystream into `blocks`; the same in both directions.
fn keystream(mode: EncryptionMode, aes: &aes::Aes256, iv: &[u8; 16], blocks: &mut [aes::Block]) {
    if mode == EncryptionMode::Ofb {
        let mut feedback = Array::from(*iv);
        for b in blocks {
            aes.encrypt_block(&mut feedback);
            xor(b, &feedback);
        }
        return;
    }
    let start = u128::from_be_bytes(*iv);
    let mut stream: Vec<aes::Block> = (0..blocks.len())
        .map(|i| Array::from(start.wrapping_add(i as u128).to_be_bytes()))
        .collect();
    aes.encrypt_blocks(&mut stream);
    for (b, s) in blocks.iter_mut().zip(&stream) {
        xor(b, s);
    }
}

fn xor(block: &mut aes::Block, with: &aes::Block) {
    for (a, b) in block.iter_mut().zip(with) {
        *a ^= b;
    }
}

fn unpad(buf: &[u8]) -> Option<&[u8]> {
    let pad = usize::from(*buf.last()?);
    if pad == 0 || pad > BLOCK || pad > buf.len() {
        return None;
    }
    let (body, padding) = buf.split_at(buf.len() - pad);
    padding.iter().all(|&b| usize::from(b) == pad).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DigestType::ALL {
            assert_eq!(d.as_str().parse::<DigestType>(), Ok(d));
            assert_eq!(d.to_string().to_uppercase().parse::<DigestType>(), Ok(d));
            assert_eq!(d.hash(&[b"x"]).as_slice().len(), d.output_len());
        }
        assert_eq!("SHA3-256".parse::<DigestType>(), Ok(DigestType::Sha3_256));
        assert!(matches!("sha224".parse::<DigestType>(), Err(NameError::Digest(_))));
        for m in EncryptionMode::ALL {
            assert_eq!(m.as_str().parse::<EncryptionMode>(), Ok(m));
        }
        assert_eq!("Legacy".parse::<EncryptionMode>(), Err(NameError::Legacy));
        assert!(matches!("pcbc".parse::<EncryptionMode>(), Err(NameError::Mode(_))));
        let lens: Vec<_> = DigestType::ALL.map(DigestType::b64_len).into();
        assert_eq!(lens, [22, 27, 43, 64, 86, 43, 86]);
    }

    #[test]
    fn every_mode_round_trips_and_pads() {
        let key = [7u8; 32];
        let iv = [0xffu8; 16]; // CTR's counter wraps on the second block
        for mode in EncryptionMode::ALL {
            for len in [0usize, 1, 15, 16, 17, 100] {
                let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut ct = encrypt(mode, &key, &iv, &plain);
                assert_eq!(ct.len(), (len / 16 + 1) * 16, "{mode} {len}");
                if len > 0 {
                    assert_ne!(&ct[..len.min(16)], &plain[..len.min(16)], "{mode} {len}");
                }
                assert_eq!(decrypt(mode, &key, &iv, &mut ct), Some(&plain[..]), "{mode} {len}");
            }
        }
    }

    #[test]
    fn modes_match_their_definitions() {
        // Each mode's definition, built from single-block AES: one block of
        // 16 x 'a', then the full PKCS#7 block.
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let iv: [u8; 16] = std::array::from_fn(|i| 15 - i as u8);
        let aes = aes::Aes256::new((&key).into());
        let p = [b'a'; 16];
        let ct = |mode| encrypt(mode, &key, &iv, &p);
        // ECB: each block alone.
        let mut first = Array::from(p);
        aes.encrypt_block(&mut first);
        assert_eq!(&ct(EncryptionMode::Ecb)[..16], first.as_slice());
        // CFB and OFB share the first keystream block E(IV); CTR too.
        let mut e_iv = Array::from(iv);
        aes.encrypt_block(&mut e_iv);
        let first: Vec<u8> = p.iter().zip(e_iv.iter()).map(|(a, b)| a ^ b).collect();
        for mode in [EncryptionMode::Cfb, EncryptionMode::Ofb, EncryptionMode::Ctr] {
            assert_eq!(&ct(mode)[..16], &first[..], "{mode}");
        }
        // Second blocks differ: CFB feeds back ciphertext, OFB the
        // keystream, CTR the IV plus one.
        let mut ctr1 = Array::from((u128::from_be_bytes(iv) + 1).to_be_bytes());
        aes.encrypt_block(&mut ctr1);
        let pad = [16u8; 16];
        let second: Vec<u8> = pad.iter().zip(ctr1.iter()).map(|(a, b)| a ^ b).collect();
        assert_eq!(&ct(EncryptionMode::Ctr)[16..], &second[..]);
        let mut ofb1 = e_iv;
        aes.encrypt_block(&mut ofb1);
        let second: Vec<u8> = pad.iter().zip(ofb1.iter()).map(|(a, b)| a ^ b).collect();
        assert_eq!(&ct(EncryptionMode::Ofb)[16..], &second[..]);
        let mut cfb1 = Array::try_from(&first[..]).expect("16 bytes");
        aes.encrypt_block(&mut cfb1);
        let second: Vec<u8> = pad.iter().zip(cfb1.iter()).map(|(a, b)| a ^ b).collect();
        assert_eq!(&ct(EncryptionMode::Cfb)[16..], &second[..]);
    }

    #[test]
    fn bad_padding_and_lengths_are_refused() {
        let key = [1u8; 32];
        let iv = [2u8; 16];
        for mode in EncryptionMode::ALL {
            assert_eq!(decrypt(mode, &key, &iv, &mut []), None);
            assert_eq!(decrypt(mode, &key, &iv, &mut [0u8; 17]), None);
        }
        assert_eq!(unpad(&[1, 2, 3, 0]), None);
        assert_eq!(unpad(&[3, 3, 2]), None);
        assert_eq!(unpad(&[17; 17]), None);
        assert_eq!(unpad(&[9, 2, 2]), Some(&[9][..]));
    }
}
