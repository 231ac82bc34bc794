//! `qcow2 snapshot [-l | -c NAME | -a NAME | -d NAME]`: list, create, apply and delete
//! internal snapshots as `qemu-img snapshot` does (listing is the default).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::common::{self, Format};

/// List, create, apply or delete the internal snapshots of an image.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// List the snapshots (the default).
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot named NAME of the disk as it is.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the disk to the snapshot with this id or name.
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete the snapshot with this name.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Quiet (accepted for `qemu-img` compatibility: nothing is printed on success).
    #[arg(short = 'q')]
    quiet: bool,
    /// Image format (only qcow2 is read).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Accepted for `qemu-img` compatibility with `-l`: listing only reads, never locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Secrets of encrypted images (qemu-img opens them fully, so it needs the secret).
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The image.
    filename: PathBuf,
}

/// What `qcow2 snapshot` does to the image.
enum Action {
    Create(String),
    Apply(String),
    Delete(String),
}

/// Run `qcow2 snapshot`.
pub fn run(args: Args) -> ExitCode {
    let chosen = [
        args.list,
        args.create.is_some(),
        args.apply.is_some(),
        args.delete.is_some(),
    ];
    if chosen.iter().filter(|&&c| c).count() > 1 {
        common::error("Cannot mix '-l', '-a', '-c', '-d'");
        eprintln!("Try 'qcow2 snapshot --help' for more info");
        return ExitCode::FAILURE;
    }
    let action = match (&args.create, &args.apply, &args.delete) {
        (Some(name), _, _) => Action::Create(name.clone()),
        (_, Some(name), _) => Action::Apply(name.clone()),
        (_, _, Some(name)) => Action::Delete(name.clone()),
        _ => return list(args),
    };
    change(&args, action)
}

/// `-c`, `-a` or `-d`: the image opened for writing (locked), changed, closed.
fn change(args: &Args, action: Action) -> ExitCode {
    let options = match args.secret.apply(qcow2::OpenOptions::new().write(true)) {
        Ok(options) => options,
        Err(e) => return common::fail(e),
    };
    let mut image = match qcow2::Qcow2::open_path_with(&args.filename, &options) {
        Ok(image) => image,
        Err(e) => return common::fail(common::could_not_open(&args.filename, common::chain(&e))),
    };
    let result = match &action {
        Action::Create(name) => image
            .create_snapshot(name)
            .map(|_| ())
            .map_err(|e| format!("Could not create snapshot '{name}': {}", why(&e))),
        Action::Apply(name) => image
            .apply_snapshot(name)
            .map_err(|e| format!("Could not apply snapshot '{name}': {}", why(&e))),
        // qemu-img finds the snapshot to delete by name only.
        Action::Delete(name) => match image.snapshots().iter().find(|s| &s.name == name) {
            None => Err(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            )),
            Some(snap) => {
                let id = snap.id.clone();
                image
                    .delete_snapshot(&id)
                    .map(|_| ())
                    .map_err(|e| format!("Could not delete snapshot '{name}': {}", why(&e)))
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => common::fail(message),
    }
}

/// The reason in qemu-img's words where it has its own.
fn why(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::NoSuchSnapshot(_) => {
            "Failed to load snapshot: No such file or directory".to_owned()
        }
        qcow2::Error::UnsupportedWrite { what } if what.contains("dirty bitmaps") => {
            "Device has active dirty bitmaps".to_owned()
        }
        qcow2::Error::UnsupportedWrite { what } if what.contains("external data file") => {
            "Operation not supported".to_owned()
        }
        other => common::chain(other),
    }
}

/// `-l`: the list `qemu-img snapshot -l` prints.
fn list(args: Args) -> ExitCode {
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
