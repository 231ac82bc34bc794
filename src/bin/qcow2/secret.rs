//! Secrets for encrypted images, taken as `qemu-img` takes them.
//!
//! `qemu-img` defines secrets with `--object secret,id=ID,data=DATA` (or `file=PATH`, with
//! `format=base64` for encoded ones) and names the one an image needs in `--image-opts`:
//! `driver=qcow2,file.filename=IMG,encrypt.key-secret=ID`, and
//! `backing.encrypt.key-secret=ID2` for its backing image, and so on down the chain. A plain
//! file name cannot name a secret in `qemu-img`; here, when the images are given by file name,
//! a lone `--object secret` (or `--secret-file PATH`) unlocks every encrypted image of the
//! chain.
//!
//! As in `qemu-img`, a passphrase must be UTF-8 text without NUL bytes (after base64
//! decoding, with `format=base64`): the library refuses any other when it unlocks an image
//! ("data from the secret is not valid UTF-8"), and an image that is not encrypted never
//! looks at it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use qcow2::{OpenOptions, Secret};

/// Secret options shared by the subcommands that read guest data.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecretArgs {
    /// Define a secret as qemu-img does: `secret,id=ID,data=DATA` or `secret,id=ID,file=PATH`
    /// (add `format=base64` for base64 data). Repeatable.
    #[arg(long = "object", value_name = "secret,id=ID,data=...|file=PATH")]
    pub objects: Vec<String>,
    /// Read the secret of every encrypted image from this file (its bytes, as `file=PATH`:
    /// UTF-8 text, a final newline included).
    #[arg(long = "secret-file", value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
}

/// A `--object secret` definition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SecretObject {
    id: String,
    bytes: Vec<u8>,
}

impl SecretArgs {
    /// Give `options` the secret for every image: `--secret-file`, or the only secret object.
    /// With several secret objects, the images must name theirs ([`SecretArgs::apply_image_opts`]).
    pub fn apply(&self, options: OpenOptions) -> Result<OpenOptions, String> {
        if let Some(path) = &self.secret_file {
            return Ok(options.secret(read_secret_file(path)?));
        }
        let objects = self.objects()?;
        match objects.as_slice() {
            [] => Ok(options),
            [only] => Ok(options.secret(only.bytes.clone())),
            _ => Ok(options),
        }
    }

    /// Open options and the file name from `--image-opts`-style options
    /// (`driver=qcow2,file.filename=IMG,encrypt.key-secret=ID,backing.encrypt.key-secret=ID2`):
    /// each `encrypt.key-secret` names the secret of the image at that depth of the chain.
    pub fn apply_image_opts(
        &self,
        image_opts: &str,
        options: OpenOptions,
    ) -> Result<(PathBuf, OpenOptions), String> {
        let objects: HashMap<String, Vec<u8>> = self
            .objects()?
            .into_iter()
            .map(|o| (o.id, o.bytes))
            .collect();
        let mut filename = None;
        let mut by_depth: HashMap<usize, Secret> = HashMap::new();
        for (key, value) in split_options(image_opts)? {
            if key == "file.filename" || key == "file" {
                filename = Some(PathBuf::from(value));
                continue;
            }
            if key == "driver" {
                if value != "qcow2" {
                    return Err(format!("only driver=qcow2 is supported, not {value:?}"));
                }
                continue;
            }
            let mut rest = key.as_str();
            let mut depth = 0;
            while let Some(r) = rest.strip_prefix("backing.") {
                depth += 1;
                rest = r;
            }
            if rest == "encrypt.format" && matches!(value.as_str(), "luks" | "aes") {
                continue; // checked against the image once it is open (see convert)
            }
            if rest != "encrypt.key-secret" {
                return Err(format!("unsupported image option {key:?}"));
            }
            let bytes = objects
                .get(&value)
                .ok_or_else(|| format!("no secret object with id {value:?}"))?;
            by_depth.insert(depth, Secret::new(bytes.clone()));
        }
        let filename = filename.ok_or("the image options name no file.filename")?;
        let options = self.apply(options)?;
        if by_depth.is_empty() {
            return Ok((filename, options));
        }
        // The chain is opened top down, one image per call.
        let depth = AtomicUsize::new(0);
        let options = options.secret_for(move |_: &Path| {
            by_depth
                .get(&depth.fetch_add(1, Ordering::Relaxed))
                .cloned()
        });
        Ok((filename, options))
    }

    /// The bytes of the secret object `id` (`encrypt.key-secret=ID` of `qcow2 create`).
    pub fn by_id(&self, id: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .objects()?
            .into_iter()
            .find(|o| o.id == id)
            .map(|o| o.bytes))
    }

    fn objects(&self) -> Result<Vec<SecretObject>, String> {
        self.objects.iter().map(|o| parse_object(o)).collect()
    }
}

/// The bytes of a secret file: all of them, as QEMU's `file=` reads them.
fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading secret file {}: {e}", path.display()))
}

/// QEMU's option syntax: `key=value` pairs separated by commas, `,,` standing for a comma.
fn split_options(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.next_if_eq(&',').is_some() {
            current.push(',');
        } else {
            parts.push(std::mem::take(&mut current));
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            // QEMU's implied first key: `--object secret,...` is `qom-type=secret`.
            None if i == 0 => Ok(("qom-type".to_owned(), p)),
            None => Err(format!("option {p:?} has no value")),
        })
        .collect()
}

/// Parse `secret,id=ID,data=DATA|file=PATH[,format=raw|base64]`.
fn parse_object(text: &str) -> Result<SecretObject, String> {
    let mut id = None;
    let mut data = None;
    let mut base64 = false;
    for (key, value) in split_options(text)? {
        match key.as_str() {
            "qom-type" if value == "secret" => {}
            "qom-type" => return Err(format!("only secret objects are supported, not {value:?}")),
            "id" => id = Some(value),
            "data" => data = Some(value.into_bytes()),
            "file" => data = Some(read_secret_file(Path::new(&value))?),
            "format" if value == "raw" => base64 = false,
            "format" if value == "base64" => base64 = true,
            other => return Err(format!("unsupported secret option {other:?}")),
        }
    }
    let id = id.ok_or("a secret object needs an id")?;
    let mut bytes = data.ok_or_else(|| format!("secret {id:?} needs data= or file="))?;
    if base64 {
        bytes =
            decode_base64(&bytes).ok_or_else(|| format!("secret {id:?} is not valid base64"))?;
    }
    Ok(SecretObject { id, bytes })
}

/// Standard base64, padding optional, whitespace not allowed (as glib decodes it for QEMU).
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = acc << 6 | value(c)?;
        }
        let bits = chunk.len() * 6;
        let acc = acc << (24 - bits);
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_as_qemu_spells_them() {
        let o = parse_object("secret,id=sec0,data=a,,b").unwrap();
        assert_eq!(
            o,
            SecretObject {
                id: "sec0".into(),
                bytes: b"a,b".to_vec()
            }
        );
        let o = parse_object("secret,id=s,data=YWJj,format=base64").unwrap();
        assert_eq!(o.bytes, b"abc");
        assert!(parse_object("secret,data=x").is_err());
        assert!(parse_object("tls-creds-x509,id=x").is_err());
        assert!(parse_object("secret,id=s,keyid=k,data=x").is_err());
        assert_eq!(decode_base64(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64(b"aGVsbG8h").unwrap(), b"hello!");
        assert!(decode_base64(b"a").is_none());
    }

    #[test]
    fn secret_files_are_read_whole() {
        let path = std::env::temp_dir().join(format!("qcow2-secret-{}", std::process::id()));
        std::fs::write(&path, b"abc\n").unwrap();
        let args = SecretArgs {
            objects: vec![format!("secret,id=s,file={}", path.display())],
            secret_file: None,
        };
        assert_eq!(args.objects().unwrap()[0].bytes, b"abc\n");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fixtures_open_with_qemu_style_secrets() {
        use positioned_io::ReadAt;
        let fixture =
            |name: &str| format!("{}/fixtures/encrypted/{name}", env!("CARGO_MANIFEST_DIR"));
        let read = |path: &Path, options: &OpenOptions| {
            let image = qcow2::Qcow2::open_path_with(path, options).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 4096];
            image
                .reader()
                .unwrap()
                .read_exact_at(0, &mut buf)
                .map_err(|e| e.to_string())
        };
        // One secret for everything.
        let args = SecretArgs {
            objects: vec!["secret,id=sec0,data=abc".into()],
            secret_file: None,
        };
        let path = PathBuf::from(fixture("luks-aes-128-ecb-sha256.qcow2"));
        read(&path, &args.apply(OpenOptions::new()).unwrap()).unwrap();
        // A chain with a secret per image, named as in qemu-img's --image-opts.
        let args = SecretArgs {
            objects: vec![
                "secret,id=t,data=top".into(),
                "secret,id=b,data=base".into(),
            ],
            secret_file: None,
        };
        let opts = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=t,backing.encrypt.key-secret=b",
            fixture("chain-luks-over-luks.qcow2")
        );
        let (path, options) = args.apply_image_opts(&opts, OpenOptions::new()).unwrap();
        read(&path, &options).unwrap();
        let swapped = opts
            .replace("secret=t,", "secret=b,")
            .replace("secret=b\0", "");
        let (path, options) = args.apply_image_opts(&swapped, OpenOptions::new()).unwrap();
        assert!(read(&path, &options).unwrap_err().contains("secret"));
        assert!(args
            .apply_image_opts(
                "driver=qcow2,file.filename=x,encrypt.key-secret=nope",
                OpenOptions::new()
            )
            .is_err());
    }
}
