//! Generates the custom_lexicon example's `com.example.recipes.*` types into OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    murmur_lexicon::Builder::new()
        .lexicon_dir("custom_lexicon/lexicons")
        .file_name("custom_lexicon.rs")
        .generate()?;
    Ok(())
}
