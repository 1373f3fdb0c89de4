//! `tdefs generate-assets DIR`: the man pages and shell completions the package installs,
//! generated from the same clap definitions as `--help` so they never drift from it.
//! Hidden: packagers run it (scripts/package.sh), users read the results.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

#[derive(clap::Args)]
pub struct AssetsArgs {
    /// Directory to fill: DIR/man/*.1 and DIR/completions/{tdefs.bash,_tdefs,tdefs.fish}.
    pub dir: PathBuf,
}

pub fn run(args: AssetsArgs) -> anyhow::Result<()> {
    let cmd = || super::Cli::command().long_version(super::long_version()).name("tdefs");
    let man = args.dir.join("man");
    make_dir(&man)?;
    // One page per visible subcommand (tdefs-mount.1, ...) besides tdefs.1.
    clap_mangen::generate_to(cmd(), &man).with_context(|| format!("cannot write the man pages to {}", man.display()))?;
    let completions = args.dir.join("completions");
    make_dir(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd(), "tdefs", &completions)
            .with_context(|| format!("cannot write the {shell} completions to {}", completions.display()))?;
    }
    eprintln!("wrote man pages to {} and completions to {}", man.display(), completions.display());
    Ok(())
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}
