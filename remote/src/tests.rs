//! A layer written as zstd:chunked, read back through its TOC with some of its files
//! "stored" and the rest fetched from the blob's bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use cas::Digest;

use crate::encode::{encode, Encoded, Options};
use crate::stream::{plan, AssembleError, Coalesce, LayerStream, ObjectSource, Piece, Pieces};
use crate::toc::ChunkedLayer;
use crate::LayerToc;

/// A layer of every kind of entry: directories, files (one long name, one with an
/// xattr, one empty, one large, two with the same content), a hardlink, a symlink, a
/// device, a fifo, a whiteout and an opaque marker.
fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>,
               path: &str,
               kind: tar::EntryType,
               data: &[u8],
               link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o640
        });
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        if let Some(l) = link {
            b.append_link(&mut h, path, l).unwrap();
        } else {
            b.append_data(&mut h, path, data).unwrap();
        }
    };
    add(&mut b, "etc/", tar::EntryType::Directory, b"", None);
    add(
        &mut b,
        "etc/hostname",
        tar::EntryType::Regular,
        b"node\n",
        None,
    );
    add(&mut b, "etc/same", tar::EntryType::Regular, b"node\n", None);
    add(&mut b, "etc/empty", tar::EntryType::Regular, b"", None);
    let long = format!("usr/share/{}/file", "d".repeat(120));
    add(&mut b, &long, tar::EntryType::Regular, b"long name\n", None);
    let big = big();
    add(
        &mut b,
        "usr/lib/big.bin",
        tar::EntryType::Regular,
        &big,
        None,
    );
    add(
        &mut b,
        "etc/link",
        tar::EntryType::Link,
        b"",
        Some("etc/hostname"),
    );
    add(
        &mut b,
        "etc/sym",
        tar::EntryType::Symlink,
        b"",
        Some("../usr/lib/big.bin"),
    );
    add(&mut b, "dev/null", tar::EntryType::Char, b"", None);
    add(&mut b, "run/fifo", tar::EntryType::Fifo, b"", None);
    add(&mut b, "var/.wh.old", tar::EntryType::Regular, b"", None);
    add(
        &mut b,
        "opt/.wh..wh..opq",
        tar::EntryType::Regular,
        b"",
        None,
    );
    b.append_pax_extensions([("SCHILY.xattr.user.note", &b"hello"[..])])
        .unwrap();
    add(
        &mut b,
        "etc/noted",
        tar::EntryType::Regular,
        b"with an xattr\n",
        None,
    );
    b.into_inner().unwrap()
}

/// 3 MB that do not compress (xorshift).
fn big() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Objects kept in a directory, by digest.
struct Dir(PathBuf);

impl ObjectSource for Dir {
    fn open(&self, digest: &Digest) -> io::Result<File> {
        File::open(self.0.join(digest.hex()))
    }
}

fn store(dir: &std::path::Path, content: &[u8]) -> Digest {
    let d = Digest::of(content);
    File::create(dir.join(d.hex()))
        .unwrap()
        .write_all(content)
        .unwrap();
    d
}

fn meta(enc: &Encoded) -> (ChunkedLayer, LayerToc) {
    let m = ChunkedLayer::from_annotations(&enc.annotations)
        .unwrap()
        .expect("zstd:chunked");
    let toc_z = &enc.blob[m.toc.offset as usize..m.toc.end() as usize];
    let split_z = m
        .tar_split
        .map(|r| &enc.blob[r.offset as usize..r.end() as usize]);
    let layer = LayerToc::from_parts(&m, toc_z, split_z).unwrap();
    (m, layer)
}

/// The pieces a registry would answer for `requests`.
fn pieces(blob: &[u8], requests: &[(u64, u64)]) -> Pieces {
    let v: Vec<io::Result<Piece>> = requests
        .iter()
        .map(|&(a, b)| {
            Ok(Piece {
                offset: a,
                bytes: blob[a as usize..b as usize].to_vec(),
            })
        })
        .collect();
    Box::new(v.into_iter())
}

fn assemble(
    layer: &LayerToc,
    stored: &std::path::Path,
    with_split: bool,
    how: Coalesce,
    mangle: impl FnOnce(&mut Vec<(u64, u64)>, &mut Vec<u8>),
    blob: &[u8],
) -> (
    Result<Vec<u8>, io::Error>,
    Option<AssembleError>,
    crate::stream::Plan,
) {
    let objects = Dir(stored.to_path_buf());
    let p = plan(&layer.toc, |d| stored.join(d.hex()).exists(), how);
    let mut requests = p.requests.clone();
    let mut blob = blob.to_vec();
    mangle(&mut requests, &mut blob);
    let split = if with_split {
        layer.tar_split.clone()
    } else {
        None
    };
    let mut s = LayerStream::new(
        layer.toc.clone(),
        split,
        &p,
        objects,
        pieces(&blob, &requests),
    )
    .unwrap();
    let slot = s.failure();
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out).map(|_| out);
    let failure = slot.lock().unwrap().clone();
    (r, failure, p)
}

type Described = (
    String,
    tar::EntryType,
    u32,
    u64,
    u64,
    u64,
    Option<Vec<u8>>,
    Digest,
    Vec<(String, Vec<u8>)>,
);

/// The entries of an archive: what the tree they make depends on.
fn describe(bytes: &[u8]) -> Vec<Described> {
    let mut a = tar::Archive::new(bytes);
    let mut v = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut xattrs = Vec::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let x = x.unwrap();
                if x.key().unwrap().starts_with("SCHILY.xattr.") {
                    xattrs.push((x.key().unwrap().to_string(), x.value_bytes().to_vec()));
                }
            }
        }
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        v.push((
            String::from_utf8_lossy(&e.path_bytes())
                .trim_end_matches('/')
                .to_string(),
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            e.link_name_bytes().map(|l| l.to_vec()),
            Digest::of(&content),
            xattrs,
        ));
    }
    v
}

/// [`assemble`] with the default coalescing and nothing damaged.
fn assemble_plainly(
    layer: &LayerToc,
    stored: &std::path::Path,
    with_split: bool,
    blob: &[u8],
) -> (
    Result<Vec<u8>, io::Error>,
    Option<AssembleError>,
    crate::stream::Plan,
) {
    assemble(
        layer,
        stored,
        with_split,
        Coalesce::default(),
        |_, _| {},
        blob,
    )
}

#[test]
fn around_its_tar_split_the_stream_is_the_original_archive() {
    let tar = layer_tar();
    let enc = encode(&tar, Options::default()).unwrap();
    let (_, layer) = meta(&enc);
    assert!(layer.has_tar_split());
    let dir = tempfile::tempdir().unwrap();
    // nothing stored, then some stored: the same bytes either way
    for (stored, fetched) in [(&[][..], 5), (&[&b"node\n"[..], b"long name\n"][..], 2)] {
        for c in stored {
            store(dir.path(), c);
        }
        let (out, failure, p) = assemble_plainly(&layer, dir.path(), true, &enc.blob);
        assert_eq!(failure, None);
        let out = out.unwrap();
        assert_eq!(Digest::of(&out), enc.diff_id);
        assert_eq!(out, tar);
        assert_eq!(p.files, 5);
        assert_eq!(p.fetched_files, fetched);
    }
}

#[test]
fn only_missing_files_are_requested_and_close_ranges_merged() {
    let enc = encode(&layer_tar(), Options::default()).unwrap();
    let (_, layer) = meta(&enc);
    let dir = tempfile::tempdir().unwrap();
    let none = plan(&layer.toc, |_| false, Coalesce::default());
    store(dir.path(), &big());
    let most = plan(
        &layer.toc,
        |d| dir.path().join(d.hex()).exists(),
        Coalesce::default(),
    );
    assert_eq!(none.fetched_files, 5);
    assert_eq!(most.fetched_files, 4);
    assert!(
        most.fetched_bytes * 10 < none.fetched_bytes,
        "{most:?} {none:?}"
    );
    // separate ranges when nothing may be merged, and long ones split
    let strict = Coalesce {
        max_gap: 0,
        max_request: 1 << 10,
    };
    let split = plan(&layer.toc, |_| false, strict);
    assert!(split.requests.len() > none.requests.len());
    assert!(split.requests.iter().all(|(a, b)| b - a <= 1 << 10));
    let (out, failure, _) = assemble(&layer, dir.path(), true, strict, |_, _| {}, &enc.blob);
    assert_eq!(failure, None);
    assert_eq!(Digest::of(&out.unwrap()), enc.diff_id);
}

#[test]
fn from_the_toc_alone_the_stream_is_an_archive_of_the_same_tree() {
    let tar = layer_tar();
    let enc = encode(
        &tar,
        Options {
            tar_split: false,
            old_annotations: true,
            ..Options::default()
        },
    )
    .unwrap();
    let (m, layer) = meta(&enc);
    assert!(m.tar_split.is_none() && !layer.has_tar_split());
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), b"node\n");
    let (out, failure, _) = assemble_plainly(&layer, dir.path(), false, &enc.blob);
    assert_eq!(failure, None);
    assert_eq!(describe(&out.unwrap()), describe(&tar));
}

#[test]
fn fetched_bytes_that_do_not_match_fail_the_stream_saying_why() {
    let enc = encode(&layer_tar(), Options::default()).unwrap();
    let (_, layer) = meta(&enc);
    let dir = tempfile::tempdir().unwrap();
    let hostname = layer
        .toc
        .entries
        .iter()
        .find(|e| e.name == "etc/hostname")
        .unwrap()
        .clone();
    let (start, end) = hostname.range.unwrap();
    // a frame of other content where this file's is: decompresses, wrong digest
    type Mangle = Box<dyn FnOnce(&mut Vec<(u64, u64)>, &mut Vec<u8>)>;
    let cases: Vec<(Mangle, &str)> = vec![
        (
            Box::new(move |_, blob: &mut Vec<u8>| {
                let frame = zstd::bulk::compress(b"nope\n", 3).unwrap();
                assert!(frame.len() as u64 <= end - start);
                blob[start as usize..start as usize + frame.len()].copy_from_slice(&frame);
            }),
            "does not match its digest",
        ),
        (
            Box::new(move |_, blob: &mut Vec<u8>| blob[start as usize] ^= 0xff),
            "does not decompress",
        ),
        (
            Box::new(|r: &mut Vec<(u64, u64)>, _| {
                r.pop();
            }),
            "ended before",
        ),
        (
            Box::new(|r: &mut Vec<(u64, u64)>, _| {
                r.remove(0);
            }),
            "was not fetched",
        ),
    ];
    for (mangle, want) in cases {
        let strict = Coalesce {
            max_gap: 0,
            max_request: 4 << 20,
        };
        let (out, failure, _) = assemble(&layer, dir.path(), true, strict, mangle, &enc.blob);
        let err = out.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let failure = failure.expect("the cause is kept");
        assert!(failure.to_string().contains(want), "{want}: {failure}");
    }
}

#[test]
fn a_stored_object_of_the_wrong_size_fails_the_stream() {
    let enc = encode(&layer_tar(), Options::default()).unwrap();
    let (_, layer) = meta(&enc);
    let dir = tempfile::tempdir().unwrap();
    let d = store(dir.path(), b"node\n");
    // damaged: shorter than its content
    std::fs::write(dir.path().join(d.hex()), b"no").unwrap();
    let (out, failure, _) = assemble_plainly(&layer, dir.path(), true, &enc.blob);
    assert!(out.is_err());
    assert!(
        matches!(failure, Some(AssembleError::ContentSize { .. })),
        "{failure:?}"
    );
}

#[test]
fn a_tar_split_that_disagrees_with_the_toc_is_refused() {
    let enc = encode(&layer_tar(), Options::default()).unwrap();
    let (_, layer) = meta(&enc);
    let p = plan(&layer.toc, |_| false, Coalesce::default());
    let mut split = layer.tar_split.clone().unwrap();
    for item in &mut split {
        if let crate::tarsplit::Item::File { name, size } = item {
            if name == "etc/hostname" {
                *size += 1;
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let e = LayerStream::new(
        layer.toc.clone(),
        Some(split),
        &p,
        Dir(dir.path().to_path_buf()),
        pieces(&enc.blob, &p.requests),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("bytes in the tar-split"), "{e}");
}

#[test]
fn an_estargz_layer_streams_as_the_tree_its_full_pull_unpacks() {
    use crate::estargz;
    let tar = layer_tar();
    let enc = crate::encode::encode_estargz(&tar, 1 << 20).unwrap();
    let n = enc.blob.len();
    let (toc_at, footer) = estargz::toc_offset(&enc.blob[n - 51..]).unwrap();
    let digest: Digest = enc.annotations[estargz::TOC_DIGEST].parse().unwrap();
    let member = &enc.blob[toc_at as usize..n - footer as usize];
    let toc = estargz::parse_toc_member(member, &digest, toc_at).unwrap();
    let big = toc
        .entries
        .iter()
        .find(|e| e.name == "usr/lib/big.bin")
        .unwrap();
    assert_eq!(big.chunks.len(), 3, "{:?}", big.chunks);
    let layer = LayerToc {
        toc,
        tar_split: None,
    };
    let mut full = Vec::new();
    flate2::read::MultiGzDecoder::new(&enc.blob[..])
        .read_to_end(&mut full)
        .unwrap();
    assert_eq!(Digest::of(&full), enc.diff_id);
    let dir = tempfile::tempdir().unwrap();
    store(dir.path(), b"node\n");
    for how in [
        Coalesce::default(),
        Coalesce {
            max_gap: 0,
            max_request: 1000,
        },
    ] {
        let (out, failure, p) = assemble(&layer, dir.path(), false, how, |_, _| {}, &enc.blob);
        assert_eq!(failure, None);
        assert_eq!(p.fetched_files, 3);
        let out = out.unwrap();
        // the TOC's own entry too, as a full pull unpacks it
        let described = describe(&out);
        assert!(described.iter().any(|d| d.0 == estargz::TOC_NAME));
        assert_eq!(described, describe(&full));
    }
    // a TOC that is not the annotation's, a footer that is not one
    assert!(matches!(
        estargz::parse_toc_member(member, &Digest::of(b"x"), toc_at),
        Err(crate::toc::TocError::Digest { .. })
    ));
    assert!(estargz::toc_offset(&[0u8; 51]).is_err());
    // a chunk whose bytes are another's: the file's digest catches it
    let (out, failure, _) = assemble(
        &layer,
        dir.path(),
        false,
        Coalesce::default(),
        |_, blob| {
            let b = &layer
                .toc
                .entries
                .iter()
                .find(|e| e.name == "etc/noted")
                .unwrap()
                .chunks[0];
            let other = crate::encode::gzip_member_for_tests(b"with an xattr!");
            assert!(other.len() as u64 <= b.end - b.start);
            blob[b.start as usize..b.start as usize + other.len()].copy_from_slice(&other);
        },
        &enc.blob,
    );
    assert!(out.is_err());
    assert!(failure.is_some(), "no failure recorded");
}
