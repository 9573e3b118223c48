//! Generates the agent.comms.* types from ../../lexicons into OUT_DIR.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lexicons = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../lexicons");
    murmur_lexicon::Builder::new()
        .lexicon_dir(&lexicons)
        .file_name("agent_comms.rs")
        .generate()?;

    // The lexicon JSON itself, embedded for runtime validation (`murmur_comms::lexicons()`).
    let mut files = Vec::new();
    collect(&lexicons.join("agent/comms"), &mut files)?;
    files.sort();
    let mut out = String::from(
        "/// The agent.comms lexicon files: (file name, JSON text).\npub const LEXICON_FILES: &[(&str, &str)] = &[\n",
    );
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            file.canonicalize()?.display().to_string()
        )?;
    }
    out.push_str("];\n");
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR")?).join("lexicon_files.rs"),
        out,
    )?;
    Ok(())
}

fn collect(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}
