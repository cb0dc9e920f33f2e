//! [`Digest`]: the name of a CAS object (sha256 of its bytes).

use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Bytes read per `read(2)` while hashing; bounded memory whatever the file size.
const HASH_CHUNK: usize = 1 << 20;

thread_local! {
    /// The buffer [`Digest::of_reader`] reads into, made once per thread: a fresh one
    /// per call was a megabyte zeroed for every file hashed, a fifth of a Commit's time
    /// for a layer of small files.
    static HASH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A sha256 content digest, held as 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

fn hash_with(mut reader: impl Read, buf: &mut [u8]) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((Digest(hasher.finalize().into()), total))
}

/// A string that is not 64 lowercase hex digits (optionally prefixed `sha256:`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 digest {0:?}")]
pub struct DigestParseError(pub String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Streams `reader` to its end; returns the digest and the number of bytes read.
    pub fn of_reader(reader: impl Read) -> io::Result<(Digest, u64)> {
        HASH_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => {
                if buf.len() < HASH_CHUNK {
                    buf.resize(HASH_CHUNK, 0);
                }
                hash_with(reader, &mut buf)
            }
            // a reader that hashes with this function itself, on this thread
            Err(_) => hash_with(reader, &mut vec![0u8; HASH_CHUNK]),
        })
    }

    /// The digest with these raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Path of the object below the objects directory: `ab/cdef…` (fan-out on the first
    /// byte keeps directories small).
    pub fn object_relpath(&self) -> PathBuf {
        let h = self.hex();
        PathBuf::from(&h[..2]).join(&h[2..])
    }

    /// The object's short second name, its alias, in the object's own fan-out
    /// directory: `ab/` (the first byte, as in the object's name) and the next 15 bytes
    /// in unpadded base64url, 20 characters; 128 bits of the digest in all.
    ///
    /// It exists for the stubs' sake. A stub's `trusted.overlay.redirect` of at most 24
    /// bytes (`/ab/` and the 20 characters), next to an empty `trusted.overlay.metacopy`,
    /// fits in the inode of ext4's default 256-byte inodes; the full `/ab/cdef…`
    /// redirect (66 bytes) does not, and costs every stub a 4 KiB xattr block. The alias
    /// is a hardlink of the object, made only when the name is free or already the same
    /// inode, so a prefix collision (even a crafted one) can only cost a stub the long
    /// redirect, never point it at other bytes. Stores whose inodes hold the long
    /// redirect make no aliases ([`crate::objects::ObjectStore::aliases`]). In the fan-out
    /// directory, a million objects' aliases are spread over 256 directories as the
    /// objects are, instead of one.
    pub fn alias(&self) -> String {
        use base64::Engine as _;
        format!(
            "{:02x}/{}",
            self.0[0],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.0[1..ALIAS_BYTES])
        )
    }

    /// The alias earlier versions made, at the top of the objects directory: the first
    /// 17 bytes of the digest in unpadded base64url, 23 characters. Stubs they wrote
    /// still redirect to it, so it is read, checked and collected with its object, but
    /// no longer made (layout version 3).
    pub fn legacy_alias(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.0[..LEGACY_ALIAS_BYTES])
    }

    /// The overlayfs redirect that points a metacopy stub at this object in the
    /// data-only lower layer: `/ab/cdef…`.
    pub fn redirect(&self) -> String {
        let h = self.hex();
        format!("/{}/{}", &h[..2], &h[2..])
    }
}

/// Bytes of the digest an alias ([`Digest::alias`]) stands for: its fan-out
/// directory's and 15 more.
pub const ALIAS_BYTES: usize = 16;
/// Characters of an alias's name in its fan-out directory.
pub const FAN_ALIAS_LEN: usize = 20;
/// Bytes of the digest a legacy alias ([`Digest::legacy_alias`]) keeps.
pub const LEGACY_ALIAS_BYTES: usize = 17;
/// Characters of a legacy alias ([`Digest::legacy_alias`]).
pub const LEGACY_ALIAS_LEN: usize = 23;

/// The digest prefix that `name` (relative to the objects directory) stands for, if it
/// is an alias as [`Digest::alias`] (16 bytes) or [`Digest::legacy_alias`] (17 bytes)
/// writes them.
pub fn alias_prefix(name: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    if is_legacy_alias_name(name) {
        let bytes = b64.decode(name).ok()?;
        return (bytes.len() == LEGACY_ALIAS_BYTES).then_some(bytes);
    }
    let (fan, rest) = name.split_once('/')?;
    if fan.len() != 2 || !is_fan_alias_name(rest) {
        return None;
    }
    let mut bytes = vec![u8::from_str_radix(fan, 16).ok()?];
    if fan.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    bytes.extend(b64.decode(rest).ok()?);
    (bytes.len() == ALIAS_BYTES).then_some(bytes)
}

fn is_base64url(name: &str) -> bool {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `name`, at the top of the objects directory, has the shape of a legacy alias
/// (23 base64url characters).
pub fn is_legacy_alias_name(name: &str) -> bool {
    name.len() == LEGACY_ALIAS_LEN && is_base64url(name)
}

/// Whether `name`, in a fan-out directory, has the shape of an alias (20 base64url
/// characters; an object's name there is 62 hex digits).
pub fn is_fan_alias_name(name: &str) -> bool {
    name.len() == FAN_ALIAS_LEN && is_base64url(name)
}

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s.strip_prefix("sha256:").unwrap_or(s);
        let bad = || DigestParseError(s.to_string());
        if hexpart.len() != 64
            || hexpart
                .bytes()
                .any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut out).map_err(|_| bad())?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn known_values_and_round_trip() {
        let d = Digest::of(b"");
        assert_eq!(d.hex(), EMPTY);
        assert_eq!(d.to_string(), format!("sha256:{EMPTY}"));
        assert_eq!(d, EMPTY.parse().unwrap());
        assert_eq!(d, format!("sha256:{EMPTY}").parse().unwrap());
        assert_eq!(d.object_relpath(), PathBuf::from("e3").join(&EMPTY[2..]));
        assert_eq!(d.redirect(), format!("/e3/{}", &EMPTY[2..]));
        // the fan-out directory, then 15 bytes in base64url: `/` and this make a
        // redirect of 24 bytes, short enough for an in-inode ext4 xattr
        assert_eq!(d.alias(), "e3/sMRCmPwcFJr79MiZb7kk");
        assert_eq!(format!("/{}", d.alias()).len(), 24);
        assert!(is_fan_alias_name(d.alias().split_once('/').unwrap().1));
        assert!(!is_fan_alias_name("e3") && !is_fan_alias_name(&d.hex()[2..]));
        // the first 17 bytes, base64url, at the top: what earlier versions made
        assert_eq!(d.legacy_alias(), "47DEQpj8HBSa-_TImW-5JCc");
        assert!(is_legacy_alias_name(&d.legacy_alias()));
        assert!(!is_legacy_alias_name("e3") && !is_legacy_alias_name(&d.hex()));
        // both name the digest's first bytes
        assert_eq!(
            alias_prefix(&d.alias()).unwrap(),
            d.as_bytes()[..ALIAS_BYTES]
        );
        assert_eq!(
            alias_prefix(&d.legacy_alias()).unwrap(),
            d.as_bytes()[..LEGACY_ALIAS_BYTES]
        );
        for not in [
            "E3/sMRCmPwcFJr79MiZb7kk",
            "e3/sMRCmPwcFJr79MiZb7k",
            "zz/sMRCmPwcFJr79MiZb7kk",
            "e3",
        ] {
            assert_eq!(alias_prefix(not), None, "{not}");
        }
    }

    #[test]
    fn reader_matches_slice() {
        let data = vec![7u8; HASH_CHUNK * 2 + 17];
        let (d, n) = Digest::of_reader(&data[..]).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(d, Digest::of(&data));
        // the thread's buffer, used again, holds nothing of the last file
        let (short, n) = Digest::of_reader(&b"abc"[..]).unwrap();
        assert_eq!((short, n), (Digest::of(b"abc"), 3));
    }

    /// A reader that hashes with `of_reader` itself while it is read gets a buffer of
    /// its own.
    #[test]
    fn a_reader_may_hash_while_it_is_hashed() {
        struct Nested(bool);
        impl Read for Nested {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if std::mem::replace(&mut self.0, true) {
                    return Ok(0);
                }
                let (inner, _) = Digest::of_reader(&b"inner"[..])?;
                buf[..32].copy_from_slice(inner.as_bytes());
                Ok(32)
            }
        }
        let (d, n) = Digest::of_reader(Nested(false)).unwrap();
        assert_eq!((d, n), (Digest::of(Digest::of(b"inner").as_bytes()), 32));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "sha256:",
            &EMPTY[1..],
            &EMPTY.to_uppercase(),
            "../../etc/passwd",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?}");
        }
    }
}
