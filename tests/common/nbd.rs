//! A minimal NBD server over a unix socket, serving a [`CrashStorage`]: QEMU reaches it as
//! `file.driver=nbd,file.server.type=unix,file.server.path=SOCK`, so the writes and flushes
//! QEMU's qcow2 driver makes land in the same log as the crate's, and go through the same
//! replay and oracle.
//!
//! What it speaks (the NBD protocol, `doc/proto.md` of the NBD project): the fixed newstyle
//! handshake; the options `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO` and
//! `NBD_OPT_ABORT` (any other, structured replies and metadata contexts included, is refused
//! with `NBD_REP_ERR_UNSUP`, which QEMU accepts); simple replies to `NBD_CMD_READ`,
//! `NBD_CMD_WRITE`, `NBD_CMD_FLUSH` and `NBD_CMD_DISC`. It advertises flush and nothing more
//! (no FUA: QEMU then follows a write it wants durable with a flush; no TRIM, no
//! WRITE_ZEROES: zeros arrive as writes), so every barrier QEMU needs is an `NBD_CMD_FLUSH`,
//! which the server turns into [`qcow2::Storage::sync`]. Requests are served one at a time,
//! in the order they arrive, each applied before its reply is sent.
//!
//! The export is larger than the file (`export_size`), as a block device holding a qcow2
//! image is: QEMU finds free clusters through the refcounts, not the file length. Reads past
//! the file's end read zeros.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use positioned_io::ReadAt;
use qcow2::{PositionalSink, Storage};

use super::crash_storage::CrashStorage;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const INFO_EXPORT: u16 = 0;

const TRANSMISSION_HAS_FLAGS: u16 = 1;
const TRANSMISSION_SEND_FLUSH: u16 = 4;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Longest option payload accepted (names are short).
const MAX_OPTION: u32 = 64 * 1024;
/// Longest read or write accepted (QEMU sends at most 32 MiB).
const MAX_REQUEST: u32 = 32 << 20;

/// A running server; stops (and joins its thread) on drop.
pub struct NbdServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Serve `storage` as an export of `export_size` bytes on a new socket `dir/NAME`.
    pub fn start(storage: CrashStorage, export_size: u64, dir: &Path, name: &str) -> NbdServer {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // A client that goes away mid-request ends its connection, not the server.
                    if let Ok(conn) = conn {
                        let _ = serve(conn, &storage, export_size);
                    }
                }
            })
        };
        NbdServer {
            path,
            stop,
            thread: Some(thread),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's `--image-opts` string for a qcow2 image on this export (with `extra` options
    /// appended when not empty).
    pub fn image_opts(&self, extra: &str) -> String {
        let mut opts = format!(
            "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={}",
            self.path.display()
        );
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        opts
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("nbd: {what}"))
}

/// One client, from the handshake to its disconnect.
fn serve(mut conn: UnixStream, storage: &CrashStorage, export_size: u64) -> io::Result<()> {
    if negotiate(&mut conn, export_size)? {
        transmit(&mut conn, storage, export_size)?;
    }
    Ok(())
}

fn option_reply(conn: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    conn.write_all(&out)
}

fn transmission_flags() -> u16 {
    TRANSMISSION_HAS_FLAGS | TRANSMISSION_SEND_FLUSH
}

/// The fixed newstyle handshake; true when the client went on to transmission.
fn negotiate(conn: &mut UnixStream, export_size: u64) -> io::Result<bool> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client_flags = read_u32(conn)?;
    loop {
        if read_u64(conn)? != IHAVEOPT {
            return Err(protocol_error("bad option magic"));
        }
        let option = read_u32(conn)?;
        let len = read_u32(conn)?;
        if len > MAX_OPTION {
            return Err(protocol_error("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let mut reply = Vec::new();
                reply.extend_from_slice(&export_size.to_be_bytes());
                reply.extend_from_slice(&transmission_flags().to_be_bytes());
                if client_flags & CLIENT_NO_ZEROES == 0 {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&reply)?;
                return Ok(true);
            }
            OPT_GO | OPT_INFO => {
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export_size.to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(conn, option, REP_INFO, &info)?;
                option_reply(conn, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                option_reply(conn, option, REP_ACK, &[])?;
                return Ok(false);
            }
            _ => option_reply(conn, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn simple_reply(conn: &mut UnixStream, error: u32, cookie: u64, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(data);
    conn.write_all(&out)
}

/// Read `len` bytes at `offset` of the file, zeros past its end.
fn read_storage(storage: &CrashStorage, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = storage.read_at(offset + done as u64, &mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(buf)
}

fn transmit(conn: &mut UnixStream, storage: &CrashStorage, export_size: u64) -> io::Result<()> {
    loop {
        if read_u32(conn)? != REQUEST_MAGIC {
            return Err(protocol_error("bad request magic"));
        }
        let _flags = read_u16(conn)?;
        let kind = read_u16(conn)?;
        let cookie = read_u64(conn)?;
        let offset = read_u64(conn)?;
        let len = read_u32(conn)?;
        let in_bounds = len <= MAX_REQUEST
            && offset
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= export_size);
        match kind {
            CMD_READ if in_bounds => match read_storage(storage, offset, len as usize) {
                Ok(data) => simple_reply(conn, 0, cookie, &data)?,
                Err(_) => simple_reply(conn, EIO, cookie, &[])?,
            },
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    return Err(protocol_error("write too long"));
                }
                let mut data = vec![0u8; len as usize];
                conn.read_exact(&mut data)?;
                let error = if !in_bounds {
                    EINVAL
                } else if storage.write_all_at(offset, &data).is_err() {
                    EIO
                } else {
                    0
                };
                simple_reply(conn, error, cookie, &[])?;
            }
            CMD_FLUSH => {
                let error = if storage.sync().is_err() { EIO } else { 0 };
                simple_reply(conn, error, cookie, &[])?;
            }
            CMD_DISC => return Ok(()),
            _ => simple_reply(conn, EINVAL, cookie, &[])?,
        }
    }
}
