//! `qcow2 snapshot -l`: list internal snapshots as `qemu-img snapshot -l` does.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::common::{self, Format};

/// List the internal snapshots of an image (this tool only reads: no -a, -c or -d).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// List the snapshots.
    #[arg(short = 'l', required = true)]
    list: bool,
    /// Image format (only qcow2 is read).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Accepted for `qemu-img` compatibility: the image is only read, never locked.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Secrets of encrypted images (qemu-img opens them fully, so it needs the secret).
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The image.
    filename: PathBuf,
}

/// Run `qcow2 snapshot -l`.
pub fn run(args: Args) -> ExitCode {
    let info = match common::image_info(&args.filename) {
        Ok(info) => info,
        Err(code) => return code,
    };
    // Like `qemu-img snapshot -l`, which opens an encrypted image with its key or not at all.
    if info.encrypted {
        let unlocked = args
            .secret
            .apply(qcow2::OpenOptions::new())
            .and_then(|options| {
                qcow2::Qcow2::open_path_with(&args.filename, &options)
                    .map_err(|e| crate::common::chain(&e))
            })
            .map(|image| image.is_unlocked());
        match unlocked {
            Ok(true) => {}
            Ok(false) => {
                return common::fail(common::could_not_open(
                    &args.filename,
                    "the image is encrypted; give its secret \
                     (--object secret,id=ID,data=... or --secret-file PATH)",
                ));
            }
            Err(e) => {
                return common::fail(common::could_not_open(&args.filename, e));
            }
        }
    }
    common::print(info.snapshot_list(&common::local_utc_offset).as_bytes())
}
