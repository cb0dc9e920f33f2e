//! EROFS on-disk structures, as the kernel reads them (`fs/erofs/erofs_fs.h`), in the
//! subset this writer uses: 4 KiB blocks, extended inodes, flat and chunk-based data,
//! inline and shared xattrs, no compression. All fields are little-endian.

/// `EROFS_SUPER_MAGIC_V1`.
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// The superblock's offset in the image.
pub const SUPERBLOCK_OFFSET: usize = 1024;
/// The superblock's size.
pub const SUPERBLOCK_SIZE: usize = 128;
/// Block size (`blkszbits` 12): the page size of every machine we serve.
pub const BLOCK_BITS: u8 = 12;
/// Block size in bytes.
pub const BLOCK_SIZE: usize = 1 << BLOCK_BITS;
/// Inode slots are 32 bytes: an inode's number (nid) is its offset / 32.
pub const SLOT_SIZE: usize = 32;
/// An extended inode (`struct erofs_inode_extended`).
pub const INODE_SIZE: usize = 64;
/// `struct erofs_xattr_ibody_header`.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// `struct erofs_xattr_entry`.
pub const XATTR_ENTRY_SIZE: usize = 4;
/// `struct erofs_dirent`.
pub const DIRENT_SIZE: usize = 12;
/// `EROFS_NAME_LEN`.
pub const NAME_LEN: usize = 255;

/// `EROFS_FEATURE_INCOMPAT_CHUNKED_FILE`: regular files use chunk-based layout.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;

/// `i_format` bit 0: extended inode.
pub const INODE_LAYOUT_EXTENDED: u16 = 1;
/// Data layouts (`i_format` bits 1-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum DataLayout {
    /// `EROFS_INODE_FLAT_PLAIN`: data in consecutive blocks from `i_u`.
    FlatPlain = 0,
    /// `EROFS_INODE_FLAT_INLINE`: whole blocks from `i_u`, the tail right after the
    /// inode, in the inode's block.
    FlatInline = 2 << 1,
    /// `EROFS_INODE_CHUNK_BASED`: a block map after the inode; `i_u` holds the chunk
    /// size.
    ChunkBased = 4 << 1,
}

/// `EROFS_NULL_ADDR`: a hole in a chunk block map.
pub const NULL_ADDR: u32 = u32::MAX;
/// Chunk size of metadata-only files, as `chunkbits - blkszbits`: 2^(12+31) bytes, so
/// a file up to 8 TiB takes one block-map entry (the format's largest chunk).
pub const CHUNK_BITS_OVER_BLOCK: u32 = 31;

/// Directory entry file types (`EROFS_FT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileType {
    /// `EROFS_FT_REG_FILE`.
    Regular = 1,
    /// `EROFS_FT_DIR`.
    Directory = 2,
    /// `EROFS_FT_CHRDEV`.
    CharDevice = 3,
    /// `EROFS_FT_BLKDEV`.
    BlockDevice = 4,
    /// `EROFS_FT_FIFO`.
    Fifo = 5,
    /// `EROFS_FT_SOCK`.
    Socket = 6,
    /// `EROFS_FT_SYMLINK`.
    Symlink = 7,
}

impl FileType {
    /// The `S_IFMT` bits of this type.
    pub fn mode_bits(self) -> u16 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::CharDevice => 0o020000,
            FileType::BlockDevice => 0o060000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
            FileType::Symlink => 0o120000,
        }
    }
}

/// Xattr name prefixes by index (`EROFS_XATTR_INDEX_*`); a name is stored as the index
/// of its longest matching prefix and the rest. Index 0 (no prefix) is not listed by
/// the kernel, so every name must match one of these.
pub const XATTR_PREFIXES: [(u8, &[u8]); 5] = [
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (1, b"user."),
    (4, b"trusted."),
    (6, b"security."),
];

/// The kernel's `new_encode_dev`: a device number as `i_u.rdev` holds it.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The superblock fields this writer sets.
#[derive(Debug, Clone, Copy)]
pub struct Superblock {
    /// Root directory's nid (must fit in 16 bits).
    pub root_nid: u16,
    /// Number of inodes.
    pub inodes: u64,
    /// Image size in blocks.
    pub blocks: u32,
    /// `feature_incompat`.
    pub feature_incompat: u32,
}

impl Superblock {
    /// The 128 bytes of `struct erofs_super_block`.
    pub fn bytes(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        // 4..8 checksum (feature_compat has no SB_CHKSUM), 8..12 feature_compat
        b[12] = BLOCK_BITS;
        // 13 sb_extslots
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inodes.to_le_bytes());
        // 24..32 build_time, 32..36 build_time_nsec: inodes are extended, each has its own
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        // 40..44 meta_blkaddr = 0 (nids count from the image's start),
        // 44..48 xattr_blkaddr = 0 (shared xattr ids too), 48..64 uuid, 64..80 volume_name
        b[80..84].copy_from_slice(&self.feature_incompat.to_le_bytes());
        b
    }
}

/// The fields of `struct erofs_inode_extended` this writer sets.
#[derive(Debug, Clone, Copy)]
pub struct Inode {
    /// `i_format`: extended, with a data layout.
    pub layout: DataLayout,
    /// `i_xattr_icount`.
    pub xattr_icount: u16,
    /// `i_mode`: type and permission bits.
    pub mode: u16,
    /// `i_size`.
    pub size: u64,
    /// `i_u`: first block, device number or chunk format, by type and layout.
    pub u: u32,
    /// `i_ino`: the inode number 32-bit `stat` shows.
    pub ino: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Link count.
    pub nlink: u32,
}

impl Inode {
    /// The 64 bytes of the inode.
    pub fn bytes(&self) -> [u8; INODE_SIZE] {
        let mut b = [0u8; INODE_SIZE];
        let format = INODE_LAYOUT_EXTENDED | self.layout as u16;
        b[0..2].copy_from_slice(&format.to_le_bytes());
        b[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        b[4..6].copy_from_slice(&self.mode.to_le_bytes());
        // 6..8 i_nb (reserved)
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..20].copy_from_slice(&self.u.to_le_bytes());
        b[20..24].copy_from_slice(&self.ino.to_le_bytes());
        b[24..28].copy_from_slice(&self.uid.to_le_bytes());
        b[28..32].copy_from_slice(&self.gid.to_le_bytes());
        b[32..40].copy_from_slice(&self.mtime.to_le_bytes());
        b[40..44].copy_from_slice(&self.mtime_nsec.to_le_bytes());
        b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        b
    }
}

/// `struct erofs_xattr_ibody_header` with no name filter.
pub fn xattr_ibody_header(shared_count: u8) -> [u8; XATTR_IBODY_HEADER_SIZE] {
    let mut b = [0u8; XATTR_IBODY_HEADER_SIZE];
    b[4] = shared_count;
    b
}

/// `struct erofs_xattr_entry`.
pub fn xattr_entry(name_len: u8, name_index: u8, value_size: u16) -> [u8; XATTR_ENTRY_SIZE] {
    let v = value_size.to_le_bytes();
    [name_len, name_index, v[0], v[1]]
}

/// `struct erofs_dirent`.
pub fn dirent(nid: u64, nameoff: u16, file_type: FileType) -> [u8; DIRENT_SIZE] {
    let mut b = [0u8; DIRENT_SIZE];
    b[0..8].copy_from_slice(&nid.to_le_bytes());
    b[8..10].copy_from_slice(&nameoff.to_le_bytes());
    b[10] = file_type as u8;
    b
}

/// `n` rounded up to a multiple of `to` (a power of two).
pub fn round_up(n: usize, to: usize) -> usize {
    (n + to - 1) & !(to - 1)
}
