//! The NBD server against real clients (`qemu-io`, `qemu-img`) and against a hostile raw
//! client that sends what no real client would.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tern_blockdev::{BlockDevice, OpenOptions};
use tern_nbd::proto::{self, cmd, errno};
use tern_nbd::{Export, NbdAddr, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 8 << 20;

fn image(dir: &Path, fill: u8) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![fill; SIZE as usize]).unwrap();
    path
}

async fn serve(path: &Path, addr: NbdAddr) -> (NbdAddr, Arc<Export>, tokio::task::JoinHandle<()>) {
    let device = BlockDevice::open(path, &OpenOptions::default()).unwrap();
    let export = Export::new("disk", Arc::new(device), false);
    let server = NbdServer::bind(&addr, vec![export.clone()]).await.unwrap();
    let addr = server.local_addr();
    (addr, export, tokio::spawn(server.run()))
}

fn uri(addr: &NbdAddr) -> String {
    match addr {
        NbdAddr::Tcp(a) => format!("nbd://{a}/disk"),
        NbdAddr::Unix(p) => format!("nbd+unix:///disk?socket={}", p.display()),
    }
}

/// Runs a client program to completion off the runtime's thread and returns its stdout.
async fn run(program: &str, args: Vec<String>) -> String {
    let program = program.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| {
                panic!("{program} is required for this test (apt-get install qemu-utils): {e}")
            })
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn qemu_io(addr: &NbdAddr, commands: &[&str]) -> String {
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(uri(addr));
    let out = run("qemu-io", args).await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("failed:"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back_patterns_over_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 0);
    for addr in [
        NbdAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        NbdAddr::Unix(dir.path().join("nbd.sock")),
    ] {
        let (addr, _export, server) = serve(&path, addr).await;
        qemu_io(
            &addr,
            &[
                "write -P 0xab 0 64k",
                "write -P 0xcd 1000 3000",
                "write -P 0x11 -f 7m 1m",
                "write -z 2m 1m",
                "discard 4m 64k",
                "flush",
            ],
        )
        .await;
        let out = qemu_io(
            &addr,
            &[
                "read -P 0xab 0 1000",
                "read -P 0xcd 1000 3000",
                "read -P 0xab 4000 61536",
                "read -P 0x11 7m 1m",
                "read -P 0 2m 1m",
                "read -P 0 4m 64k",
            ],
        )
        .await;
        assert_eq!(out.matches("read ").count(), 6, "{out}");
        server.abort();
    }
    // The file holds what the clients wrote.
    let data = std::fs::read(&path).unwrap();
    assert!(data[..1000].iter().all(|b| *b == 0xab));
    assert!(data[1000..4000].iter().all(|b| *b == 0xcd));
    assert!(data[7 << 20..].iter().all(|b| *b == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_compares_equal_and_sees_a_difference() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 0x5a);
    let (addr, _export, server) = serve(&path, NbdAddr::Tcp("127.0.0.1:0".parse().unwrap())).await;
    let copy = dir.path().join("copy.img");
    std::fs::copy(&path, &copy).unwrap();
    let compare = |a: String| {
        vec![
            "compare".to_owned(),
            "-f".into(),
            "raw".into(),
            "-F".into(),
            "raw".into(),
            a,
            copy.display().to_string(),
        ]
    };
    let out = run("qemu-img", compare(uri(&addr))).await;
    assert!(out.contains("Images are identical"), "{out}");
    qemu_io(&addr, &["write -P 0x01 5m 512"]).await;
    let output = Command::new("qemu-img")
        .args(compare(uri(&addr)))
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "qemu-img compare must see the write"
    );
    server.abort();
}

/// A raw client: negotiates with NBD_OPT_GO (optionally structured replies) and exchanges
/// hand-made requests.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    async fn connect(addr: &NbdAddr, structured: bool) -> Raw {
        let NbdAddr::Tcp(addr) = addr else {
            unreachable!()
        };
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert_eq!(stream.read_u64().await.unwrap(), proto::INIT_MAGIC);
        assert_eq!(stream.read_u64().await.unwrap(), proto::OPTS_MAGIC);
        let _flags = stream.read_u16().await.unwrap();
        stream
            .write_u32(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES)
            .await
            .unwrap();
        let mut raw = Raw { stream };
        if structured {
            assert_eq!(
                raw.option(proto::opt::STRUCTURED_REPLY, &[]).await,
                vec![proto::rep::ACK]
            );
        }
        let mut go = Vec::new();
        go.extend_from_slice(&4u32.to_be_bytes());
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        let replies = raw.option(proto::opt::GO, &go).await;
        assert_eq!(replies, vec![proto::rep::INFO, proto::rep::ACK]);
        raw
    }

    /// Sends an option and returns the reply types up to the final one.
    async fn option(&mut self, option: u32, data: &[u8]) -> Vec<u32> {
        self.stream.write_u64(proto::OPTS_MAGIC).await.unwrap();
        self.stream.write_u32(option).await.unwrap();
        self.stream.write_u32(data.len() as u32).await.unwrap();
        self.stream.write_all(data).await.unwrap();
        let mut types = Vec::new();
        loop {
            assert_eq!(
                self.stream.read_u64().await.unwrap(),
                proto::OPTION_REPLY_MAGIC
            );
            assert_eq!(self.stream.read_u32().await.unwrap(), option);
            let kind = self.stream.read_u32().await.unwrap();
            let len = self.stream.read_u32().await.unwrap();
            let mut skip = vec![0u8; len as usize];
            self.stream.read_exact(&mut skip).await.unwrap();
            types.push(kind);
            if kind != proto::rep::INFO && kind != proto::rep::SERVER {
                return types;
            }
        }
    }

    async fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) {
        let request = proto::Request {
            flags,
            command,
            cookie: 42,
            offset,
            length,
        };
        self.stream.write_all(&request.encode()).await.unwrap();
        self.stream.write_all(payload).await.unwrap();
    }

    /// Reads a simple reply; returns the error and `data_len` bytes of data on success.
    async fn simple_reply(&mut self, data_len: usize) -> (u32, Vec<u8>) {
        assert_eq!(
            self.stream.read_u32().await.unwrap(),
            proto::SIMPLE_REPLY_MAGIC
        );
        let error = self.stream.read_u32().await.unwrap();
        assert_eq!(self.stream.read_u64().await.unwrap(), 42);
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.stream.read_exact(&mut data).await.unwrap();
        (error, data)
    }

    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte).await, Ok(0) | Err(_))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_errors_or_a_disconnect_and_never_disturb_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 0x77);
    let (addr, _export, server) = serve(&path, NbdAddr::Tcp("127.0.0.1:0".parse().unwrap())).await;
    let mut bystander = Raw::connect(&addr, false).await;
    let mut tried = 0;

    // Answerable: each gets the spec's error, and the connection stays usable.
    let mut client = Raw::connect(&addr, false).await;
    let answerable: [(u16, u16, u64, u32, usize, u32); 7] = [
        (cmd::READ, 0, SIZE, 1, 0, errno::EINVAL), // read past the end
        (cmd::READ, 0, u64::MAX - 1, 4, 0, errno::EINVAL), // offset overflow
        (cmd::WRITE, 0, SIZE - 2, 4, 4, errno::ENOSPC), // write past the end (payload sent)
        (cmd::READ, 0, 0, (32 << 20) + 1, 0, errno::EINVAL), // read over 32 MiB
        (77, 0, 0, 0, 0, errno::EINVAL),           // unknown command
        (cmd::READ, 1 << 12, 0, 512, 0, errno::EINVAL), // unknown flag
        (cmd::FLUSH, 0, 5, 1, 0, errno::EINVAL),   // flush with a range
    ];
    for (command, flags, offset, length, payload, expected) in answerable {
        client
            .send(command, flags, offset, length, &vec![0xee; payload])
            .await;
        let (error, _) = client.simple_reply(0).await;
        assert_eq!(
            error, expected,
            "command {command} offset {offset} length {length}"
        );
        tried += 1;
    }
    client.send(cmd::READ, 0, 0, 16, &[]).await;
    assert_eq!(client.simple_reply(16).await, (0, vec![0x77; 16]));

    // Unanswerable: bad magic, a write over 32 MiB, a client vanishing mid-payload.
    let mut bad_magic = Raw::connect(&addr, false).await;
    bad_magic.stream.write_all(&[0xff; 28]).await.unwrap();
    assert!(bad_magic.closed().await);
    tried += 1;
    let mut huge = Raw::connect(&addr, false).await;
    huge.send(cmd::WRITE, 0, 0, (32 << 20) + 1, &[]).await;
    assert!(huge.closed().await);
    tried += 1;
    let mut vanishing = Raw::connect(&addr, false).await;
    vanishing.send(cmd::WRITE, 0, 0, 4096, &[0xee; 100]).await;
    drop(vanishing);
    tried += 1;

    // Negotiation abuse: unknown option, malformed GO, unknown export, oversized option.
    let mut negotiating = {
        let NbdAddr::Tcp(a) = &addr else {
            unreachable!()
        };
        let mut stream = TcpStream::connect(a).await.unwrap();
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello).await.unwrap();
        stream
            .write_u32(proto::CLIENT_FIXED_NEWSTYLE)
            .await
            .unwrap();
        Raw { stream }
    };
    assert_eq!(
        negotiating.option(99, b"junk").await,
        vec![proto::rep::ERR_UNSUP]
    );
    assert_eq!(
        negotiating
            .option(proto::opt::GO, &[0, 0, 0, 9, b'x'])
            .await,
        vec![proto::rep::ERR_INVALID]
    );
    let mut unknown = 3u32.to_be_bytes().to_vec();
    unknown.extend_from_slice(b"nop");
    unknown.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        negotiating.option(proto::opt::GO, &unknown).await,
        vec![proto::rep::ERR_UNKNOWN]
    );
    assert_eq!(
        negotiating.option(proto::opt::STARTTLS, &[]).await,
        vec![proto::rep::ERR_POLICY]
    );
    assert_eq!(
        negotiating.option(proto::opt::LIST, &[]).await,
        vec![proto::rep::SERVER, proto::rep::ACK]
    );
    negotiating
        .stream
        .write_u64(proto::OPTS_MAGIC)
        .await
        .unwrap();
    negotiating.stream.write_u32(proto::opt::GO).await.unwrap();
    negotiating.stream.write_u32(u32::MAX).await.unwrap();
    assert!(negotiating.closed().await);
    tried += 5;

    // None of it wrote a byte or disturbed the bystander.
    bystander.send(cmd::READ, 0, SIZE - 8, 8, &[]).await;
    assert_eq!(bystander.simple_reply(8).await, (0, vec![0x77; 8]));
    let data = std::fs::read(&path).unwrap();
    assert!(
        data.iter().all(|b| *b == 0x77),
        "a refused request changed the image"
    );
    eprintln!("{tried} distinct malformed inputs refused");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_reads_send_zero_runs_as_holes_and_errors_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 0);
    let (addr, export, server) = serve(&path, NbdAddr::Tcp("127.0.0.1:0".parse().unwrap())).await;
    let mut client = Raw::connect(&addr, true).await;
    client.send(cmd::WRITE, 0, 8192, 4096, &[9u8; 4096]).await;
    // Structured: a NONE chunk with DONE.
    let mut chunk = [0u8; 20];
    client.stream.read_exact(&mut chunk).await.unwrap();
    assert_eq!(u16::from_be_bytes([chunk[6], chunk[7]]), proto::reply::NONE);
    client.send(cmd::READ, 0, 0, 16384, &[]).await;
    let mut kinds = Vec::new();
    loop {
        client.stream.read_exact(&mut chunk).await.unwrap();
        let flags = u16::from_be_bytes([chunk[4], chunk[5]]);
        let kind = u16::from_be_bytes([chunk[6], chunk[7]]);
        let len = u32::from_be_bytes(chunk[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        client.stream.read_exact(&mut payload).await.unwrap();
        kinds.push(kind);
        if kind == proto::reply::OFFSET_DATA {
            assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 8192);
            assert!(payload[8..].iter().all(|b| *b == 9));
        }
        if flags & proto::reply::FLAG_DONE != 0 {
            break;
        }
    }
    use proto::reply::{OFFSET_DATA, OFFSET_HOLE};
    assert_eq!(kinds, vec![OFFSET_HOLE, OFFSET_DATA, OFFSET_HOLE]);

    // A refused export answers with ESHUTDOWN and the reason as text.
    export.hold().await;
    export.refuse(errno::ESHUTDOWN, "disk moved: reconnect to the target");
    client.send(cmd::READ, 0, 0, 512, &[]).await;
    client.stream.read_exact(&mut chunk).await.unwrap();
    assert_eq!(
        u16::from_be_bytes([chunk[6], chunk[7]]),
        proto::reply::ERROR
    );
    let len = u32::from_be_bytes(chunk[16..20].try_into().unwrap());
    let mut payload = vec![0u8; len as usize];
    client.stream.read_exact(&mut payload).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        errno::ESHUTDOWN
    );
    assert_eq!(&payload[6..], b"disk moved: reconnect to the target");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_larger_than_the_connection_budget_is_answered() {
    // A guest's fstrim can discard gigabytes in one request; it carries no payload and must
    // not wait for budget the connection can never have (64 MiB).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let (addr, _export, server) = serve(&path, NbdAddr::Tcp("127.0.0.1:0".parse().unwrap())).await;
    let mut client = Raw::connect(&addr, false).await;
    client.send(cmd::TRIM, 0, 0, 1 << 30, &[]).await;
    assert_eq!(client.simple_reply(0).await.0, 0);
    client.send(cmd::WRITE_ZEROES, 0, 0, 512 << 20, &[]).await;
    assert_eq!(client.simple_reply(0).await.0, 0);
    client.send(cmd::READ, 0, 0, 8, &[]).await;
    assert_eq!(client.simple_reply(8).await, (0, vec![0; 8]));
    server.abort();
}
