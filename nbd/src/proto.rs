//! The NBD wire format as pure functions: constants, the request header parser and the
//! encoders for option replies and transmission replies. No IO happens here, so the parser
//! can be fuzzed and property-tested on its own.
//!
//! Numbers follow `doc/proto.md` of the NetworkBlockDevice project (the "fixed newstyle"
//! negotiation, simple and structured replies). Everything on the wire is big-endian.

/// Sent first by the server: `NBDMAGIC`.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: precedes the handshake flags and every option the client sends.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Precedes every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Precedes every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Precedes a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Precedes a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: leave out the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options a client may send during negotiation.
pub mod opt {
    /// Choose an export and enter transmission (old style, no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (refused: bind NBD to loopback or a Unix socket).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies in transmission.
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod rep {
    /// The option succeeded (the last reply to it).
    pub const ACK: u32 = 1;
    /// One export, in reply to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// One piece of information, in reply to `NBD_OPT_INFO` / `NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    const ERROR: u32 = 1 << 31;
    /// The option is not known to this server.
    pub const ERR_UNSUP: u32 = ERROR | 1;
    /// The option is known but refused by policy.
    pub const ERR_POLICY: u32 = ERROR | 2;
    /// The option was malformed.
    pub const ERR_INVALID: u32 = ERROR | 3;
    /// No export of that name.
    pub const ERR_UNKNOWN: u32 = ERROR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR | 7;
    /// The option's payload is too large.
    pub const ERR_TOO_BIG: u32 = ERROR | 9;
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's name.
    pub const NAME: u16 = 1;
    /// A human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags sent with the export's size.
pub mod tflag {
    /// Always set: the other flags are meaningful.
    pub const HAS_FLAGS: u16 = 1;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// A flush on one connection covers writes completed on every connection.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Transmission commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (the data follows the request).
    pub const WRITE: u16 = 1;
    /// Disconnect after the requests in flight.
    pub const DISC: u16 = 2;
    /// Make completed writes durable.
    pub const FLUSH: u16 = 3;
    /// Discard a range.
    pub const TRIM: u16 = 4;
    /// Make a range read as zeros.
    pub const WRITE_ZEROES: u16 = 6;
}

/// Command flags.
pub mod cflag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1;
    /// Write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// Only one extent (block status; not supported here).
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail write-zeroes fast if it would be slow (not advertised).
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// The last chunk of this reply.
    pub const FLAG_DONE: u16 = 1;
    /// No payload (ends a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range that reads as zeros.
    pub const OFFSET_HOLE: u16 = 2;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error numbers of the NBD protocol (not the host's errno values).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on the device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down (or, here, the disk moved away).
    pub const ESHUTDOWN: u32 = 108;

    /// Maps a host errno to the protocol's (anything unknown is EIO).
    pub fn from_host(host: Option<i32>) -> u32 {
        match host {
            Some(1) | Some(13) | Some(30) => EPERM,
            Some(12) => ENOMEM,
            Some(22) => EINVAL,
            Some(28) | Some(122) => ENOSPC,
            Some(75) => EOVERFLOW,
            Some(95) => ENOTSUP,
            Some(108) => ESHUTDOWN,
            _ => EIO,
        }
    }
}

/// The largest read or write this server accepts (and advertises as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option payload accepted during negotiation; an export name is at most 4 KiB.
pub const MAX_OPTION: u32 = 16 << 10;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission request header, parsed but not yet checked against the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflag`).
    pub flags: u16,
    /// Command (`cmd`).
    pub command: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for a write, the payload that follows).
    pub length: u32,
}

/// A request header that cannot be answered: the stream is out of step and must be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}: the stream is out of step")]
pub struct BadMagic(pub u32);

impl Request {
    /// Parses the 28-byte header.
    pub fn parse(bytes: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([bytes[4], bytes[5]]),
            command: u16::from_be_bytes([bytes[6], bytes[7]]),
            cookie: u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(bytes[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes the header (what a client sends; used by tests and tools).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Whether the request's range lies inside an export of `size` bytes.
    pub fn in_range(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size)
    }
}

/// What the server decides about a request before doing any IO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Do it.
    Accept,
    /// Reply with this error (a write's payload is read and dropped first).
    Reject(u32, &'static str),
    /// A write whose payload cannot be skipped safely: close the connection.
    Disconnect(&'static str),
}

/// Checks a request against an export of `size` bytes; `structured` says whether structured
/// replies were negotiated. Pure, so every hostile header can be tried without a socket.
pub fn check(request: &Request, size: u64, read_only: bool, structured: bool) -> Verdict {
    const KNOWN_FLAGS: u16 = cflag::FUA | cflag::NO_HOLE | cflag::DF;
    if request.command == cmd::WRITE && request.length > MAX_REQUEST {
        return Verdict::Disconnect("write payload over 32 MiB");
    }
    if request.flags & !KNOWN_FLAGS != 0 {
        return Verdict::Reject(errno::EINVAL, "unknown command flags");
    }
    if request.flags & cflag::DF != 0 && (request.command != cmd::READ || !structured) {
        return Verdict::Reject(
            errno::EINVAL,
            "DF is only for reads with structured replies",
        );
    }
    if request.flags & cflag::NO_HOLE != 0 && request.command != cmd::WRITE_ZEROES {
        return Verdict::Reject(errno::EINVAL, "NO_HOLE is only for write-zeroes");
    }
    match request.command {
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => {}
        cmd::FLUSH => {
            return if request.offset == 0 && request.length == 0 {
                Verdict::Accept
            } else {
                Verdict::Reject(errno::EINVAL, "flush takes no range")
            };
        }
        cmd::DISC => return Verdict::Accept,
        _ => return Verdict::Reject(errno::EINVAL, "unknown command"),
    }
    let writes = request.command != cmd::READ;
    if writes && read_only {
        return Verdict::Reject(errno::EPERM, "the export is read-only");
    }
    if request.command == cmd::READ && request.length > MAX_REQUEST {
        return Verdict::Reject(errno::EINVAL, "read over 32 MiB");
    }
    if !request.in_range(size) {
        return if writes {
            Verdict::Reject(errno::ENOSPC, "range past the end of the export")
        } else {
            Verdict::Reject(errno::EINVAL, "range past the end of the export")
        };
    }
    Verdict::Accept
}

/// An option reply header followed by `data`.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
    out
}

/// The payload of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn info_string(kind: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// The name and information requests of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name ("" is the default export).
    pub name: String,
    /// The information types asked for.
    pub requests: Vec<u16>,
}

/// Parses the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`; `None` if it is malformed.
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(data.get(4..name_end)?).ok()?.to_owned();
    let count = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let list = data.get(name_end + 2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Some(InfoRequest { name, requests })
}

/// A simple reply header (a read's data follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header for a payload of `length` bytes.
pub fn structured_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// A complete structured error chunk (ends the reply) with a human-readable message.
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // The message is at most 4 KiB by the spec; ours are short, but cut on a char boundary.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message[..end];
    let payload_len = 6 + message.len();
    let mut out = Vec::with_capacity(20 + payload_len);
    out.extend_from_slice(&structured_header(
        reply::FLAG_DONE,
        reply::ERROR,
        cookie,
        payload_len as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// A structured hole chunk: `length` bytes at `offset` read as zeros.
pub fn structured_hole(flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[0..20].copy_from_slice(&structured_header(flags, reply::OFFSET_HOLE, cookie, 12));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out[28..32].copy_from_slice(&length.to_be_bytes());
    out
}

/// The header of a structured data chunk (`OFFSET_DATA`) of `length` data bytes at `offset`;
/// the data follows it.
pub fn structured_data_header(flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[0..20].copy_from_slice(&structured_header(
        flags,
        reply::OFFSET_DATA,
        cookie,
        length + 8,
    ));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out
}

/// The runs of a read buffer for a sparse structured reply: `(start, len, is_hole)` in
/// 4 KiB granules, so that zero runs travel as 12-byte hole chunks instead of data.
pub fn sparse_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    const GRANULE: usize = 4096;
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (index, granule) in data.chunks(GRANULE).enumerate() {
        let hole = granule.len() == GRANULE && granule.iter().all(|b| *b == 0);
        match runs.last_mut() {
            Some(last) if last.2 == hole => last.1 += granule.len(),
            _ => runs.push((index * GRANULE, granule.len(), hole)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let original = request(cmd::WRITE, cflag::FUA, 4096, 512);
        assert_eq!(Request::parse(&original.encode()), Ok(original));
        let mut bytes = original.encode();
        bytes[0] ^= 1;
        assert!(Request::parse(&bytes).is_err());
    }

    #[test]
    fn hostile_requests_get_the_specified_errors() {
        let size = 1 << 20;
        let check = |r: &Request| check(r, size, false, true);
        assert_eq!(check(&request(cmd::READ, 0, 0, 4096)), Verdict::Accept);
        assert_eq!(check(&request(cmd::WRITE, 0, size - 1, 1)), Verdict::Accept);
        assert!(matches!(
            check(&request(cmd::READ, 0, size, 1)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            check(&request(cmd::WRITE, 0, size - 1, 2)),
            Verdict::Reject(errno::ENOSPC, _)
        ));
        assert!(matches!(
            check(&request(cmd::READ, 0, u64::MAX, 2)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            check(&request(cmd::WRITE, 0, 0, MAX_REQUEST + 1)),
            Verdict::Disconnect(_)
        ));
        assert!(matches!(
            check(&request(cmd::READ, 0, 0, MAX_REQUEST + 1)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            check(&request(99, 0, 0, 0)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            check(&request(cmd::READ, 1 << 9, 0, 1)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            check(&request(cmd::FLUSH, 0, 1, 0)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            check(&request(cmd::WRITE, cflag::DF, 0, 1)),
            Verdict::Reject(errno::EINVAL, _)
        ));
        assert!(matches!(
            super::check(&request(cmd::TRIM, 0, 0, 1), size, true, true),
            Verdict::Reject(errno::EPERM, _)
        ));
    }

    #[test]
    fn info_requests_parse_and_malformed_ones_do_not() {
        let mut data = Vec::new();
        data.extend_from_slice(&4u32.to_be_bytes());
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&data),
            Some(InfoRequest {
                name: "disk".into(),
                requests: vec![info::BLOCK_SIZE, info::NAME]
            })
        );
        assert_eq!(parse_info_request(&data[..data.len() - 1]), None);
        let mut long_name = data.clone();
        long_name[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&long_name), None);
        assert_eq!(parse_info_request(&[]), None);
    }

    #[test]
    fn sparse_runs_cover_the_buffer_and_only_full_zero_granules_are_holes() {
        let mut data = vec![0u8; 5 * 4096 + 100];
        data[4096 + 5] = 1;
        assert_eq!(
            sparse_runs(&data),
            vec![
                (0, 4096, true),
                (4096, 4096, false),
                (8192, 3 * 4096, true),
                (5 * 4096, 100, false)
            ]
        );
    }

    proptest! {
        #[test]
        fn check_never_accepts_out_of_range_or_oversized(
            flags in any::<u16>(),
            command in 0u16..10,
            offset in any::<u64>(),
            length in any::<u32>(),
            size in any::<u64>(),
            read_only in any::<bool>(),
        ) {
            let request = Request { flags, command, cookie: 1, offset, length };
            prop_assert_eq!(Request::parse(&request.encode()), Ok(request));
            let verdict = check(&request, size, read_only, true);
            if verdict == Verdict::Accept && command != cmd::FLUSH && command != cmd::DISC {
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= size));
                prop_assert!(length <= MAX_REQUEST);
                prop_assert!(command == cmd::READ || !read_only);
            }
        }

        #[test]
        fn info_request_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(parsed) = parse_info_request(&data) {
                prop_assert_eq!(parsed.name.len() + 2 * parsed.requests.len() + 6, data.len());
            }
        }
    }
}
