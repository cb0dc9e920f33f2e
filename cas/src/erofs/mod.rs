//! A layer's metadata as one EROFS image: the alternative to a stub tree.
//!
//! The image holds what a committed layer's stub tree holds, in one file instead of one
//! inode per entry: directories, symlinks, devices, whiteouts (character devices 0/0),
//! owners, modes, times and xattrs, and for each regular file with content a
//! metadata-only inode that redirects into the CAS (`trusted.overlay.metacopy` and
//! `trusted.overlay.redirect`, exactly the xattrs a stub carries). Mounted read-only
//! (`mount -t erofs <image>`: Linux 6.12+ mounts EROFS from a regular file, older
//! kernels through a loop device over it), it is an
//! overlayfs lower layer like a stub tree: `lowerdir=<image mounts…>::<cas/objects>`.
//!
//! Unlike composefs images, which describe a whole tree to be mounted as one overlay,
//! a layer image is one layer of a stack: its `trusted.overlay.*` xattrs are written as
//! given (an opaque directory is opaque to the overlay it is a lower of) and whiteouts
//! stay whiteouts. Nothing a layer brings reaches them unfiltered: as for stubs, the
//! unpack drops every `trusted.overlay.*` xattr of the layer's own
//! ([`crate::stub::is_overlay_private`]) before building the image.
//!
//! What the writer produces: 4 KiB blocks; the root directory's inode first (its number
//! must fit in 16 bits), then every inode in depth-first order with its xattrs and
//! inline data (symlink targets, directory tails, the one-entry block map of a
//! metadata-only file), then the shared xattr table (values used by more than one
//! inode, such as the empty metacopy xattr of every file), then directory blocks. No
//! compression and no data: an image is metadata only, so it is built in memory in one
//! pass over the tree and written with one `write`.
//!
//! [`Image`] is the tree being built, with the operations a layer's entries need
//! (later entries replace earlier ones, hardlinks, removals); [`Image::to_bytes`]
//! serialises it.
//!
//! ## Why one image per layer, not a stub tree (measured)
//! `cas-bench layout` (`make bench-layout`) writes the metadata of one layer of small
//! files both ways on one XFS loop filesystem and walks it through overlayfs with cold
//! caches, median of 3 (2 cores, kernel 6.18):
//!
//! | files | stub tree: write + sync | image: build + write + fsync | disk, stub / image | inodes | lstat all + read 1/10 |
//! |---:|---:|---:|---:|---:|---:|
//! | 5,000 | 0.192 s (38.4 µs/file) | 0.019 s (3.8 µs/file) | 353 / 246 B per file | 5,100 / 1 | 0.218 / 0.241 s |
//! | 50,000 | 1.915 s (38.3 µs/file) | 0.148 s (3.0 µs/file) | 359 / 246 B per file | 51,000 / 1 | 2.245 / 2.168 s |
//!
//! A stub costs five or six metadata transactions in the kernel (create, two xattrs,
//! size, times, sometimes owner and mode); an image entry costs a few hundred bytes of
//! memory and its share of one write. The image is 10-13x cheaper to make, a third
//! smaller on disk, one inode instead of one per entry, and walks as fast (within the
//! runs' noise). It is
//! also simpler to keep crash-safe: one file made durable with fsync + rename, where a
//! stub tree is thousands of entries a crash can leave half made.
//!
//! What it costs, and how each cost is met:
//! * **a mount per layer in use**: the daemon mounts a layer's image at its `fs`
//!   directory when the layer is first needed, so the mounts it plans
//!   (`lowerdir=<fs of each parent>::<objects>`) are unchanged, and unmounts it at
//!   Remove ([`mount`]). overlayfs takes a private clone of each lower layer's mount
//!   when it is mounted, so a container keeps running when the daemon detaches its
//!   image mounts (at shutdown);
//! * **Linux 6.12+** mounts EROFS from a regular file; older kernels (and those built
//!   without `CONFIG_EROFS_FS_BACKED_BY_FILE`) refuse a file with `ENOTBLK`, and the
//!   store then mounts each image through a read-only loop device over it, set to
//!   autoclear so the kernel releases it with the image's last mount
//!   ([`crate::sys::ImageMounts`], [`ringio::loopdev`]). It costs one loop device per
//!   layer in use and walks as fast: `cas-bench layout --runs 3` (same machine, later
//!   run), cold `lstat` of every file + read of 1/10 through overlayfs, 0.156 / 0.159 s
//!   at 5,000 files and 1.484 / 1.619 s at 50,000 (file / loop device; the three runs
//!   at 50,000 spread 1.42-1.65 s either way). With direct I/O on the device, the image
//!   is cached once (as the device's pages), not also as the file's. Where neither
//!   works (no EROFS) the store keeps writing stub trees; both layouts stay readable in
//!   one store: a layer is an image if `layer.erofs` is beside its `fs`;
//! * **no page-cache or dedup change**: file data still lives only in `cas/objects`;
//!   aliases are never needed, since the image has no inode-size limit on xattrs.
//!
//! Rejected: composefs images (the `composefs` crate's writer) describe one whole tree
//! and escape every `trusted.overlay.*` xattr and whiteout, so a layer's opaque
//! directories and whiteouts would not act in a stack of layers; one flattened image per
//! chain would make each Commit cost the whole chain, not its layer; batching stub
//! calls through io_uring leaves the kernel's per-inode transactions, which are the cost.

pub mod format;
pub mod mount;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use format::{DataLayout, FileType, BLOCK_SIZE, INODE_SIZE, SLOT_SIZE};

use crate::digest::Digest;

/// Why an entry cannot be put in an image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// The path is empty or has `..`, `.` or a root after its start.
    #[error("{0:?}: not a path inside the layer")]
    BadPath(PathBuf),
    /// A parent of the path is not a directory in this image.
    #[error("{0:?}: a parent is not a directory")]
    NotADirectory(PathBuf),
    /// Nothing at this path.
    #[error("{0:?}: no such entry in the layer")]
    NotFound(PathBuf),
    /// A regular file with a size and no object to read its bytes from.
    #[error("{0:?}: a file with content but no object")]
    NoContent(PathBuf),
    /// Hardlinks name files, never directories.
    #[error("{0:?}: a hardlink to a directory")]
    LinkToDirectory(PathBuf),
    /// A name longer than 255 bytes.
    #[error("{0:?}: name longer than {} bytes", format::NAME_LEN)]
    NameTooLong(PathBuf),
    /// An xattr outside the namespaces EROFS stores (user, trusted, security, ACLs).
    #[error("{path:?}: xattr {name:?} is in no namespace EROFS stores")]
    XattrNamespace {
        /// The entry.
        path: PathBuf,
        /// The xattr's name.
        name: String,
    },
    /// An xattr too large for the format (name over 255 bytes after its prefix, value
    /// over 64 KiB, or all of an inode's over 256 KiB).
    #[error("{0:?}: xattrs too large for an EROFS inode")]
    XattrTooLarge(PathBuf),
    /// An entry's inline data cannot fit in one block with its inode (a symlink target
    /// with many xattrs).
    #[error("{0:?}: inode, xattrs and inline data exceed one block")]
    TooLarge(PathBuf),
    /// The image has more than 2^32 inodes or over 16 TiB of metadata.
    #[error("image too large")]
    ImageTooLarge,
}

/// An entry an image cannot hold is refused as the stub tree would refuse it.
impl From<ImageError> for crate::error::CasError {
    fn from(e: ImageError) -> Self {
        use crate::error::CasError::Hostile;
        let hostile = |path: PathBuf, reason| Hostile { path, reason };
        match e {
            ImageError::NotADirectory(p) => hostile(p, "a parent of an entry is not a directory"),
            ImageError::BadPath(p) | ImageError::NotFound(p) | ImageError::NoContent(p) => {
                hostile(p, "an entry the layer image cannot hold")
            }
            ImageError::LinkToDirectory(p) => hostile(
                p,
                "hardlink to an entry that is not earlier in the same layer",
            ),
            ImageError::NameTooLong(p) => hostile(p, "a name longer than 255 bytes"),
            ImageError::XattrNamespace { path, .. } => {
                hostile(path, "an xattr in a namespace EROFS does not store")
            }
            ImageError::XattrTooLarge(p) | ImageError::TooLarge(p) => {
                hostile(p, "xattrs too large for one inode")
            }
            ImageError::ImageTooLarge => hostile(PathBuf::new(), "a layer too large for one image"),
        }
    }
}

/// Writes `img` at `at` through a temporary name and a rename, so that `at` is never a
/// partial image. Not synced: the caller's `syncfs` of the store, which must follow
/// before anything depends on the image (the layer's manifest), makes it durable with
/// the layer's objects in one flush. Returns the image's size.
pub fn write_image(img: &Image, at: &Path) -> Result<u64, crate::error::CasError> {
    use crate::error::CasError;
    let bytes = img.to_bytes()?;
    let tmp = at.with_extension("tmp");
    std::fs::write(&tmp, &bytes).map_err(CasError::io("write", &tmp))?;
    std::fs::rename(&tmp, at).map_err(CasError::io("rename", at))?;
    Ok(bytes.len() as u64)
}

/// What an entry of the image shows of itself besides its type and content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attrs {
    /// Permission bits, set-id and sticky included (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (EROFS keeps no atime).
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Extended attributes, full names.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What `stat` shows of a file, without its xattrs.
impl From<&std::fs::Metadata> for Attrs {
    fn from(md: &std::fs::Metadata) -> Attrs {
        use std::os::unix::fs::MetadataExt;
        Attrs {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            xattrs: Vec::new(),
        }
    }
}

impl Attrs {
    /// Attributes of a directory a layer names only as the parent of deeper entries:
    /// what the unpack gives such directories (0755, root, time 0).
    pub fn implicit_dir() -> Attrs {
        Attrs {
            mode: 0o755,
            ..Attrs::default()
        }
    }
}

/// A non-directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// A regular file of `size` bytes held by `object` in the data-only lower layer,
    /// which the file's `trusted.overlay.redirect` names in full (`/ab/cdef…`). `None`
    /// only for empty files.
    File {
        /// Its size.
        size: u64,
        /// Where its bytes are.
        object: Option<Digest>,
    },
    /// A symlink to the target.
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

impl Leaf {
    /// An overlayfs whiteout: a character device 0/0.
    pub const WHITEOUT: Leaf = Leaf::CharDevice { major: 0, minor: 0 };

    fn file_type(&self) -> FileType {
        match self {
            Leaf::File { .. } => FileType::Regular,
            Leaf::Symlink(_) => FileType::Symlink,
            Leaf::CharDevice { .. } => FileType::CharDevice,
            Leaf::BlockDevice { .. } => FileType::BlockDevice,
            Leaf::Fifo => FileType::Fifo,
            Leaf::Socket => FileType::Socket,
        }
    }
}

type NodeId = usize;

#[derive(Debug)]
enum Content {
    Dir(BTreeMap<Box<[u8]>, NodeId>),
    Leaf(Leaf),
}

#[derive(Debug)]
struct Node {
    attrs: Attrs,
    content: Content,
    /// Names linking to this node (hardlinks); 0 once unlinked everywhere.
    links: u32,
}

/// A layer's tree, built entry by entry, then serialised as an EROFS image.
#[derive(Debug)]
pub struct Image {
    nodes: Vec<Node>,
}

impl Image {
    /// An image whose root directory has `root`'s attributes.
    pub fn new(root: Attrs) -> Image {
        Image {
            nodes: vec![Node {
                attrs: root,
                content: Content::Dir(BTreeMap::new()),
                links: 1,
            }],
        }
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.nodes.iter().filter(|n| n.links > 0).count()
    }

    /// Whether only the root is there.
    pub fn is_empty(&self) -> bool {
        self.len() == 1
    }

    /// Replaces the root directory's attributes.
    pub fn set_root(&mut self, attrs: Attrs) {
        self.nodes[0].attrs = attrs;
    }

    /// Makes `path` a directory with `attrs`. A directory already there keeps its
    /// entries (a layer may name a directory again, to change it); anything else there
    /// is replaced. Missing parents are made with [`Attrs::implicit_dir`].
    pub fn dir(&mut self, path: &Path, attrs: Attrs) -> Result<(), ImageError> {
        let (parent, name) = self.parent_of(path, true)?;
        if let Some(&id) = self.children(parent).get(name) {
            if matches!(self.nodes[id].content, Content::Dir(_)) {
                self.nodes[id].attrs = attrs;
                return Ok(());
            }
        }
        let id = self.push(attrs, Content::Dir(BTreeMap::new()));
        self.link_at(parent, name, id);
        Ok(())
    }

    /// Puts `leaf` at `path`, replacing whatever is there (a directory with all it
    /// holds). Missing parents are made with [`Attrs::implicit_dir`].
    pub fn insert(&mut self, path: &Path, attrs: Attrs, leaf: Leaf) -> Result<(), ImageError> {
        let (parent, name) = self.parent_of(path, true)?;
        let id = self.push(attrs, Content::Leaf(leaf));
        self.link_at(parent, name, id);
        Ok(())
    }

    /// Makes `path` a hardlink of the file at `target`, replacing whatever is at `path`.
    pub fn link(&mut self, path: &Path, target: &Path) -> Result<(), ImageError> {
        let id = self.lookup(target)?;
        if matches!(self.nodes[id].content, Content::Dir(_)) {
            return Err(ImageError::LinkToDirectory(target.to_path_buf()));
        }
        let (parent, name) = self.parent_of(path, true)?;
        if self.children(parent).get(name) == Some(&id) {
            return Ok(());
        }
        self.nodes[id].links += 1;
        self.link_at(parent, name, id);
        Ok(())
    }

    /// Removes whatever is at `path` (a directory with all it holds); `false` if
    /// nothing was there.
    pub fn remove(&mut self, path: &Path) -> Result<bool, ImageError> {
        let (parent, name) = self.parent_of(path, false)?;
        let Content::Dir(entries) = &mut self.nodes[parent].content else {
            unreachable!("parent_of returns directories")
        };
        match entries.remove(name) {
            Some(old) => {
                self.unlink(old);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Removes every entry of the directory at `path` (an opaque directory's earlier
    /// content in this layer).
    pub fn clear_dir(&mut self, path: &Path) -> Result<(), ImageError> {
        let id = self.lookup(path)?;
        let Content::Dir(entries) = &mut self.nodes[id].content else {
            return Err(ImageError::NotADirectory(path.to_path_buf()));
        };
        for old in std::mem::take(entries).into_values() {
            self.unlink(old);
        }
        Ok(())
    }

    /// Whether something is at `path`, and whether it is a directory.
    pub fn kind(&self, path: &Path) -> Option<bool> {
        let id = self.lookup(path).ok()?;
        Some(matches!(self.nodes[id].content, Content::Dir(_)))
    }

    /// The non-directory entry at `path`, if there is one.
    pub fn leaf(&self, path: &Path) -> Option<&Leaf> {
        let id = self.lookup(path).ok()?;
        match &self.nodes[id].content {
            Content::Leaf(l) => Some(l),
            Content::Dir(_) => None,
        }
    }

    /// The attributes of the entry at `path`, to change them.
    pub fn attrs_mut(&mut self, path: &Path) -> Result<&mut Attrs, ImageError> {
        let id = self.lookup(path)?;
        Ok(&mut self.nodes[id].attrs)
    }

    fn push(&mut self, attrs: Attrs, content: Content) -> NodeId {
        self.nodes.push(Node {
            attrs,
            content,
            links: 1,
        });
        self.nodes.len() - 1
    }

    fn children(&self, dir: NodeId) -> &BTreeMap<Box<[u8]>, NodeId> {
        match &self.nodes[dir].content {
            Content::Dir(entries) => entries,
            Content::Leaf(_) => unreachable!("children of a leaf"),
        }
    }

    /// Links `id` at `name` in `parent`, dropping what was there.
    fn link_at(&mut self, parent: NodeId, name: &[u8], id: NodeId) {
        let Content::Dir(entries) = &mut self.nodes[parent].content else {
            unreachable!("parent_of returns directories")
        };
        if let Some(old) = entries.insert(name.into(), id) {
            self.unlink(old);
        }
    }

    /// Drops one link of `id` and, when it was the last, everything under it.
    fn unlink(&mut self, id: NodeId) {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let node = &mut self.nodes[id];
            node.links -= 1;
            if node.links > 0 {
                continue;
            }
            if let Content::Dir(entries) = &mut node.content {
                stack.extend(std::mem::take(entries).into_values());
            }
        }
    }

    /// The node at `path`.
    fn lookup(&self, path: &Path) -> Result<NodeId, ImageError> {
        let mut at = 0;
        for name in components(path)? {
            at = match &self.nodes[at].content {
                Content::Dir(entries) => *entries
                    .get(name.as_bytes())
                    .ok_or_else(|| ImageError::NotFound(path.to_path_buf()))?,
                Content::Leaf(_) => return Err(ImageError::NotADirectory(path.to_path_buf())),
            };
        }
        Ok(at)
    }

    /// The directory that holds `path`'s last name, and that name; with `make`, missing
    /// parents are made.
    fn parent_of<'p>(
        &mut self,
        path: &'p Path,
        make: bool,
    ) -> Result<(NodeId, &'p [u8]), ImageError> {
        let names = components(path)?;
        let Some((last, parents)) = names.split_last() else {
            return Err(ImageError::BadPath(path.to_path_buf()));
        };
        if last.len() > format::NAME_LEN {
            return Err(ImageError::NameTooLong(path.to_path_buf()));
        }
        let mut at = 0;
        for name in parents {
            let next = self.children(at).get(name.as_bytes()).copied();
            at = match next {
                Some(id) if matches!(self.nodes[id].content, Content::Dir(_)) => id,
                Some(_) => return Err(ImageError::NotADirectory(path.to_path_buf())),
                None if make => {
                    if name.len() > format::NAME_LEN {
                        return Err(ImageError::NameTooLong(path.to_path_buf()));
                    }
                    let id = self.push(Attrs::implicit_dir(), Content::Dir(BTreeMap::new()));
                    self.link_at(at, name.as_bytes(), id);
                    id
                }
                None => return Err(ImageError::NotFound(path.to_path_buf())),
            };
        }
        Ok((at, last.as_bytes()))
    }

    /// The image's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        Writer::new(self)?.write()
    }
}

/// `path`'s names; it must be relative (a leading `/` is allowed) with no `.` or `..`.
fn components(path: &Path) -> Result<Vec<&OsStr>, ImageError> {
    let mut out = Vec::new();
    for (i, c) in path.components().enumerate() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir if i == 0 => {}
            Component::CurDir if i == 0 => {}
            _ => return Err(ImageError::BadPath(path.to_path_buf())),
        }
    }
    Ok(out)
}

/// One xattr as EROFS stores it: prefix index, the rest of the name, the value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct XAttr {
    index: u8,
    suffix: Vec<u8>,
    value: Vec<u8>,
}

impl XAttr {
    fn new(name: &[u8], value: &[u8], path: impl Fn() -> PathBuf) -> Result<XAttr, ImageError> {
        let (index, prefix) = format::XATTR_PREFIXES
            .iter()
            .filter(|(_, p)| name.starts_with(p))
            .max_by_key(|(_, p)| p.len())
            .ok_or_else(|| ImageError::XattrNamespace {
                path: path(),
                name: String::from_utf8_lossy(name).into_owned(),
            })?;
        let suffix = &name[prefix.len()..];
        if suffix.len() > u8::MAX as usize || value.len() > u16::MAX as usize {
            return Err(ImageError::XattrTooLarge(path()));
        }
        Ok(XAttr {
            index: *index,
            suffix: suffix.to_vec(),
            value: value.to_vec(),
        })
    }

    fn size(&self) -> usize {
        entry_size(self.suffix.len(), self.value.len())
    }

    fn write(&self, out: &mut Vec<u8>) {
        write_entry(out, self.index, &self.suffix, &self.value);
    }
}

/// Bytes of one xattr entry with a name suffix of `name` bytes and a value of `value`.
fn entry_size(name: usize, value: usize) -> usize {
    format::round_up(format::XATTR_ENTRY_SIZE + name + value, 4)
}

fn write_entry(out: &mut Vec<u8>, index: u8, suffix: &[u8], value: &[u8]) {
    out.extend_from_slice(&format::xattr_entry(
        suffix.len() as u8,
        index,
        value.len() as u16,
    ));
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    pad(out, 4);
}

/// `trusted.` is prefix 4: the metacopy and redirect xattrs are stored by suffix.
const TRUSTED_INDEX: u8 = 4;
const METACOPY_SUFFIX: &[u8] = b"overlay.metacopy";
const REDIRECT_SUFFIX: &[u8] = b"overlay.redirect";
/// Bytes of a full redirect, `/ab/cdef…`.
const REDIRECT_LEN: usize = 1 + 2 + 1 + 62;

/// One inode as it will be written: kept small, since a layer has one per entry.
struct Slot<'a> {
    node: NodeId,
    /// The directory holding its first name, and that name (for error messages).
    parent: u32,
    name: &'a [u8],
    file_type: FileType,
    layout: DataLayout,
    /// The object a metadata-only file reads from (its redirect and the shared
    /// metacopy xattr are written from it).
    object: Option<Digest>,
    /// The entry's own xattrs.
    local: Vec<XAttr>,
    size: u64,
    nlink: u32,
    /// Entries of a directory, sorted, with `.` and `..`: (name, slot).
    dirents: Vec<(&'a [u8], u32)>,
    /// Byte offset of the inode.
    offset: usize,
    /// First block (directories), device number, or chunk format.
    u: u32,
}

impl Slot<'_> {
    fn xattr_size(&self) -> usize {
        let redirect = if self.object.is_some() {
            4 + entry_size(REDIRECT_SUFFIX.len(), REDIRECT_LEN)
        } else {
            0
        };
        if self.local.is_empty() && redirect == 0 {
            return 0;
        }
        format::XATTR_IBODY_HEADER_SIZE
            + redirect
            + self.local.iter().map(XAttr::size).sum::<usize>()
    }

    /// Bytes after the inode and its xattrs: a symlink's target, a directory's tail,
    /// a metadata-only file's block map.
    fn inline_len(&self, image: &Image) -> usize {
        match self.layout {
            DataLayout::FlatInline => match &image.nodes[self.node].content {
                Content::Leaf(Leaf::Symlink(t)) => t.len(),
                _ => self.size as usize % BLOCK_SIZE,
            },
            DataLayout::ChunkBased => 4 * chunks(self.size) as usize,
            DataLayout::FlatPlain => 0,
        }
    }
}

/// Block-map entries of a metadata-only file of `size` bytes.
fn chunks(size: u64) -> u64 {
    let chunk_bits = format::BLOCK_BITS as u32 + format::CHUNK_BITS_OVER_BLOCK;
    size.div_ceil(1u64 << chunk_bits)
}

struct Writer<'a> {
    image: &'a Image,
    slots: Vec<Slot<'a>>,
}

impl<'a> Writer<'a> {
    /// The path of slot `s`, for an error message.
    fn path_of(&self, s: usize) -> PathBuf {
        let mut names = Vec::new();
        let mut at = s;
        while at != 0 {
            names.push(self.slots[at].name);
            at = self.slots[at].parent as usize;
        }
        let mut p = PathBuf::from("/");
        for n in names.iter().rev() {
            p.push(OsStr::from_bytes(n));
        }
        p
    }

    /// Orders the inodes (depth first, the root first, each inode once however many
    /// names it has) and works out each one's layout.
    fn new(image: &'a Image) -> Result<Writer<'a>, ImageError> {
        let mut w = Writer {
            image,
            slots: Vec::new(),
        };
        let mut slot_of: HashMap<NodeId, u32> = HashMap::new();
        // (node, parent slot, name) to visit; directories are visited once each
        let mut stack: Vec<(NodeId, u32, &'a [u8])> = vec![(0, 0, b"")];
        while let Some((id, parent, name)) = stack.pop() {
            let me = w.slots.len() as u32;
            slot_of.insert(id, me);
            w.slots
                .push(Slot::empty(id, parent, name, &image.nodes[id]));
            let Content::Dir(entries) = &image.nodes[id].content else {
                continue;
            };
            let mut dirents: Vec<(&'a [u8], u32)> = Vec::with_capacity(entries.len() + 2);
            dirents.push((b".", me));
            dirents.push((b"..", parent));
            let mut subdirs = Vec::new();
            for (name, &child) in entries {
                let slot = match slot_of.get(&child) {
                    Some(&s) => s,
                    None => match &image.nodes[child].content {
                        Content::Dir(_) => {
                            subdirs.push((child, me, &name[..]));
                            u32::MAX // numbered when visited, patched below
                        }
                        Content::Leaf(_) => {
                            let s = w.slots.len() as u32;
                            slot_of.insert(child, s);
                            w.slots
                                .push(Slot::empty(child, me, name, &image.nodes[child]));
                            s
                        }
                    },
                };
                dirents.push((name, slot));
            }
            w.slots[me as usize].nlink = 2 + subdirs.len() as u32;
            w.slots[me as usize].dirents = dirents;
            stack.extend(subdirs.into_iter().rev());
            if w.slots.len() > u32::MAX as usize / 2 {
                return Err(ImageError::ImageTooLarge);
            }
        }
        for slot in w.slots.iter_mut() {
            if let Content::Dir(entries) = &image.nodes[slot.node].content {
                for ((_, s), (_, child)) in slot.dirents[2..].iter_mut().zip(entries) {
                    *s = slot_of[child];
                }
                slot.dirents.sort_by(|a, b| a.0.cmp(b.0));
            }
        }
        for s in 0..w.slots.len() {
            w.contents(s)?;
        }
        Ok(w)
    }

    /// Slot `s`'s xattrs, data layout, size and inline data.
    fn contents(&mut self, s: usize) -> Result<(), ImageError> {
        let node = &self.image.nodes[self.slots[s].node];
        let mut local = Vec::with_capacity(node.attrs.xattrs.len());
        for (name, value) in &node.attrs.xattrs {
            local.push(XAttr::new(name, value, || self.path_of(s))?);
        }
        let slot = &mut self.slots[s];
        slot.local = local;
        match &node.content {
            Content::Dir(_) => {
                let (blocks, tail) = dir_blocks(&slot.dirents);
                slot.size = (blocks * BLOCK_SIZE + tail) as u64;
                // the tail goes inline when it fits in the inode's block; see place()
                slot.layout = DataLayout::FlatInline;
            }
            Content::Leaf(leaf) => {
                slot.nlink = node.links;
                match leaf {
                    Leaf::File { size, object } => {
                        slot.size = *size;
                        match object {
                            Some(d) if *size > 0 => {
                                slot.object = Some(*d);
                                slot.layout = DataLayout::ChunkBased;
                                slot.u = format::CHUNK_BITS_OVER_BLOCK;
                            }
                            Some(_) => {}
                            None if *size > 0 => {
                                return Err(ImageError::NoContent(self.path_of(s)));
                            }
                            None => {}
                        }
                    }
                    Leaf::Symlink(target) => {
                        slot.size = target.len() as u64;
                        slot.layout = DataLayout::FlatInline;
                    }
                    Leaf::CharDevice { major, minor } | Leaf::BlockDevice { major, minor } => {
                        slot.u = format::encode_dev(*major, *minor);
                    }
                    Leaf::Fifo | Leaf::Socket => {}
                }
            }
        }
        let slot = &self.slots[s];
        if slot.local.len() > u8::MAX as usize || slot.xattr_size() > 256 << 10 {
            return Err(ImageError::XattrTooLarge(self.path_of(s)));
        }
        if matches!(slot.file_type, FileType::Symlink)
            && INODE_SIZE + slot.xattr_size() + slot.size as usize > BLOCK_SIZE
        {
            return Err(ImageError::TooLarge(self.path_of(s)));
        }
        Ok(())
    }

    /// Places every inode, then the shared xattr (the metacopy marker), then the
    /// directory blocks; returns where the shared xattr and the blocks start, and the
    /// image's end.
    fn place(&mut self) -> Result<(usize, usize, usize), ImageError> {
        let mut at = format::SUPERBLOCK_OFFSET + format::SUPERBLOCK_SIZE;
        for s in 0..self.slots.len() {
            at = format::round_up(at, SLOT_SIZE);
            let meta = INODE_SIZE + self.slots[s].xattr_size();
            let tail = self.slots[s].inline_len(self.image);
            let slot = &mut self.slots[s];
            if tail > 0 && meta + tail > BLOCK_SIZE {
                // a directory tail that cannot share a block with its inode: a whole block
                slot.layout = DataLayout::FlatPlain;
            } else if tail > 0 && at / BLOCK_SIZE != (at + meta + tail - 1) / BLOCK_SIZE {
                // inline data may not cross a block boundary: start the inode on a new block
                at = format::round_up(at, BLOCK_SIZE);
            }
            if slot.layout == DataLayout::FlatInline
                && matches!(slot.file_type, FileType::Directory)
                && tail == 0
            {
                slot.layout = DataLayout::FlatPlain;
            }
            slot.offset = at;
            at += meta
                + if slot.layout == DataLayout::FlatPlain {
                    0
                } else {
                    tail
                };
        }
        if self.slots[0].offset / SLOT_SIZE > u16::MAX as usize {
            return Err(ImageError::ImageTooLarge);
        }
        let xattrs = format::round_up(at, 4);
        at = xattrs + entry_size(METACOPY_SUFFIX.len(), 0);
        let blocks_start = format::round_up(at, BLOCK_SIZE);
        let mut block = blocks_start / BLOCK_SIZE;
        for slot in &mut self.slots {
            if matches!(slot.file_type, FileType::Directory) {
                let size = slot.size as usize;
                let whole = size / BLOCK_SIZE
                    + usize::from(
                        slot.layout == DataLayout::FlatPlain && !size.is_multiple_of(BLOCK_SIZE),
                    );
                slot.u = if whole > 0 { block as u32 } else { 0 };
                block += whole;
            }
        }
        if block > u32::MAX as usize {
            return Err(ImageError::ImageTooLarge);
        }
        Ok((xattrs, blocks_start, block * BLOCK_SIZE))
    }

    fn write(mut self) -> Result<Vec<u8>, ImageError> {
        let (xattrs_at, blocks_at, end) = self.place()?;
        let metacopy_id = (xattrs_at / 4) as u32;
        let nid = |s: &Slot| (s.offset / SLOT_SIZE) as u64;
        let nids: Vec<u64> = self.slots.iter().map(nid).collect();
        let types: Vec<FileType> = self.slots.iter().map(|s| s.file_type).collect();
        let mut out = Vec::with_capacity(end);
        out.resize(format::SUPERBLOCK_OFFSET, 0);
        out.extend_from_slice(
            &format::Superblock {
                root_nid: nids[0] as u16,
                inodes: self.slots.len() as u64,
                blocks: (end / BLOCK_SIZE) as u32,
                feature_incompat: format::FEATURE_INCOMPAT_CHUNKED_FILE,
            }
            .bytes(),
        );
        for (i, slot) in self.slots.iter().enumerate() {
            out.resize(slot.offset, 0);
            let node = &self.image.nodes[slot.node];
            let icount = match slot.xattr_size() {
                0 => 0,
                n => 1 + (n - format::XATTR_IBODY_HEADER_SIZE) / 4,
            };
            out.extend_from_slice(
                &format::Inode {
                    layout: slot.layout,
                    xattr_icount: icount as u16,
                    mode: slot.file_type.mode_bits() | (node.attrs.mode & 0o7777) as u16,
                    size: slot.size,
                    u: slot.u,
                    ino: i as u32 + 1,
                    uid: node.attrs.uid,
                    gid: node.attrs.gid,
                    mtime: node.attrs.mtime as u64,
                    mtime_nsec: node.attrs.mtime_nsec,
                    nlink: slot.nlink,
                }
                .bytes(),
            );
            if icount > 0 {
                let shared = u8::from(slot.object.is_some());
                out.extend_from_slice(&format::xattr_ibody_header(shared));
                if let Some(d) = &slot.object {
                    out.extend_from_slice(&metacopy_id.to_le_bytes());
                    write_entry(
                        &mut out,
                        TRUSTED_INDEX,
                        REDIRECT_SUFFIX,
                        d.redirect().as_bytes(),
                    );
                }
                for x in &slot.local {
                    x.write(&mut out);
                }
            }
            if slot.layout == DataLayout::FlatPlain {
                continue;
            }
            match &node.content {
                Content::Leaf(Leaf::Symlink(target)) => out.extend_from_slice(target),
                Content::Leaf(Leaf::File { size, .. }) => {
                    for _ in 0..chunks(*size) {
                        out.extend_from_slice(&format::NULL_ADDR.to_le_bytes());
                    }
                }
                Content::Dir(_) => {
                    let (_, tail) = render_dir(&slot.dirents, &nids, &types, true);
                    out.extend_from_slice(&tail);
                }
                Content::Leaf(_) => {}
            }
        }
        out.resize(xattrs_at, 0);
        write_entry(&mut out, TRUSTED_INDEX, METACOPY_SUFFIX, b"");
        out.resize(blocks_at, 0);
        for slot in &self.slots {
            if matches!(slot.file_type, FileType::Directory) {
                let inline = slot.layout == DataLayout::FlatInline;
                let (blocks, tail) = render_dir(&slot.dirents, &nids, &types, false);
                for b in blocks {
                    out.extend_from_slice(&b);
                }
                if !inline && !tail.is_empty() {
                    out.extend_from_slice(&tail);
                    pad(&mut out, BLOCK_SIZE);
                }
            }
        }
        out.resize(end, 0);
        Ok(out)
    }
}

impl<'a> Slot<'a> {
    fn empty(node: NodeId, parent: u32, name: &'a [u8], n: &Node) -> Slot<'a> {
        Slot {
            node,
            parent,
            name,
            file_type: match &n.content {
                Content::Dir(_) => FileType::Directory,
                Content::Leaf(l) => l.file_type(),
            },
            layout: DataLayout::FlatPlain,
            object: None,
            local: Vec::new(),
            size: 0,
            nlink: 1,
            dirents: Vec::new(),
            offset: 0,
            u: 0,
        }
    }
}

/// How a directory's sorted entries split into blocks: (whole blocks, tail bytes).
fn dir_blocks(dirents: &[(&[u8], u32)]) -> (usize, usize) {
    let mut blocks = 0;
    let mut used = 0;
    for (name, _) in dirents {
        let n = format::DIRENT_SIZE + name.len();
        if used + n > BLOCK_SIZE {
            blocks += 1;
            used = 0;
        }
        used += n;
    }
    (blocks, used)
}

/// A directory's whole blocks (padded) and its tail: each block its dirents, then
/// their names. Only the tail is rendered when `tail_only`.
fn render_dir(
    dirents: &[(&[u8], u32)],
    nids: &[u64],
    types: &[FileType],
    tail_only: bool,
) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    let render = |entries: &[(&[u8], u32)]| {
        let mut b = Vec::with_capacity(BLOCK_SIZE);
        let mut nameoff = format::DIRENT_SIZE * entries.len();
        for (name, slot) in entries {
            let slot = *slot as usize;
            b.extend_from_slice(&format::dirent(nids[slot], nameoff as u16, types[slot]));
            nameoff += name.len();
        }
        for (name, _) in entries {
            b.extend_from_slice(name);
        }
        b
    };
    for (i, (name, _)) in dirents.iter().enumerate() {
        let n = format::DIRENT_SIZE + name.len();
        if used + n > BLOCK_SIZE {
            if !tail_only {
                let mut b = render(&dirents[start..i]);
                b.resize(BLOCK_SIZE, 0);
                blocks.push(b);
            }
            start = i;
            used = 0;
        }
        used += n;
    }
    (blocks, render(&dirents[start..]))
}

fn pad(out: &mut Vec<u8>, to: usize) {
    let n = format::round_up(out.len(), to);
    out.resize(n, 0);
}
