//! `murmur lex`: lint lexicons, generate Rust, validate records, check for breaking changes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use murmur_lexicon::{Builder, LexiconError, LexiconSet, breaking_changes};

/// `murmur lex ...` subcommands.
#[derive(Subcommand)]
pub enum LexCommand {
    /// Check every lexicon file under DIR; exit 1 listing each problem (file, JSON path, rule).
    Lint {
        /// Directory of lexicon JSON files (searched recursively).
        dir: PathBuf,
    },
    /// Generate Rust types for the lexicons under DIR (to stdout, or to -o).
    Gen {
        /// Directory of lexicon JSON files.
        dir: PathBuf,
        /// Output file, or directory to write `lexicons.rs` into.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Only generate NSIDs with this prefix (repeatable).
        #[arg(long)]
        only: Vec<String>,
    },
    /// Validate a record (JSON, or DAG-CBOR for *.cbor) against record type NSID; exit 1 with
    /// the reasons when it is invalid.
    Validate {
        /// Directory of lexicon JSON files.
        dir: PathBuf,
        /// The record type, e.g. `agent.comms.task`.
        nsid: String,
        /// The record: atproto JSON, or DAG-CBOR when the name ends in `.cbor`.
        file: PathBuf,
    },
    /// Compare two versions of a lexicon set; exit 1 listing each breaking change.
    Breaking {
        /// Directory holding the old version.
        old: PathBuf,
        /// Directory holding the new version.
        new: PathBuf,
    },
}

/// Runs one `murmur lex` subcommand.
pub fn run(command: LexCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match command {
        LexCommand::Lint { dir } => {
            let (set, mut issues) = LexiconSet::load_dir_unchecked(&dir)?;
            issues.extend(set.lint());
            if issues.is_empty() {
                println!("{}: {} lexicon(s), no problems", dir.display(), set.len());
                Ok(ExitCode::SUCCESS)
            } else {
                for issue in &issues {
                    eprintln!("{issue}");
                }
                eprintln!("{} problem(s) in {}", issues.len(), dir.display());
                Ok(ExitCode::FAILURE)
            }
        }
        LexCommand::Gen { dir, out, only } => {
            let mut builder = Builder::new().lexicon_dir(&dir);
            for prefix in only {
                builder = builder.only(prefix);
            }
            let code = match builder.generate_string() {
                Ok(code) => code,
                Err(LexiconError::Lint(issues)) => return Ok(report_lint(&issues)),
                Err(e) => return Err(e.into()),
            };
            match out {
                None => print!("{code}"),
                Some(out) => {
                    let path = if out.is_dir() {
                        out.join("lexicons.rs")
                    } else {
                        out
                    };
                    std::fs::write(&path, code).map_err(|e| format!("{}: {e}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LexCommand::Validate { dir, nsid, file } => {
            let (set, issues) = LexiconSet::load_dir_unchecked(&dir)?;
            if !issues.is_empty() {
                return Ok(report_lint(&issues));
            }
            // Unresolved refs to lexicons outside DIR only matter if the record reaches them.
            for issue in set.lint() {
                eprintln!("warning: {issue}");
            }
            let result = read_and_validate(&set, &nsid, &file)?;
            match result {
                Ok(()) => {
                    println!("valid {nsid}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("invalid {nsid}: {} problem(s)", errors.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        LexCommand::Breaking { old, new } => {
            let (old_set, old_issues) = LexiconSet::load_dir_unchecked(&old)?;
            let (new_set, new_issues) = LexiconSet::load_dir_unchecked(&new)?;
            let issues: Vec<_> = old_issues.into_iter().chain(new_issues).collect();
            if !issues.is_empty() {
                return Ok(report_lint(&issues));
            }
            let changes = breaking_changes(&old_set, &new_set);
            if changes.is_empty() {
                println!(
                    "no breaking changes from {} to {}",
                    old.display(),
                    new.display()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for change in &changes {
                    println!("{change}");
                }
                eprintln!("{} breaking change(s)", changes.len());
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

type Validation = Result<(), Vec<murmur_lexicon::ValidationError>>;

fn read_and_validate(
    set: &LexiconSet,
    nsid: &str,
    file: &Path,
) -> Result<Validation, Box<dyn std::error::Error>> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if file.extension().is_some_and(|e| e == "cbor") {
        return Ok(set.validate_record_dag_cbor(nsid, &bytes));
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(json) => Ok(set.validate_record_json(nsid, &json)),
        Err(e) => Ok(Err(vec![murmur_lexicon::ValidationError::new(
            "$",
            format!("not valid JSON: {e}"),
        )])),
    }
}

fn report_lint(issues: &[murmur_lexicon::LintIssue]) -> ExitCode {
    for issue in issues {
        eprintln!("{issue}");
    }
    eprintln!(
        "{} lexicon problem(s); run `murmur lex lint` on the directory for details",
        issues.len()
    );
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn interop() -> PathBuf {
        root().join("crates/murmur-lexicon/tests/fixtures/interop/lexicon")
    }

    fn write(dir: &Path, name: &str, value: &serde_json::Value) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
        path
    }

    #[test]
    fn lint_passes_on_the_project_lexicons() {
        assert_eq!(
            run(LexCommand::Lint {
                dir: root().join("lexicons")
            })
            .unwrap(),
            ExitCode::SUCCESS
        );
    }

    #[test]
    fn lint_fails_on_every_interop_invalid_lexicon_naming_the_problem() {
        let cases: serde_json::Value =
            serde_json::from_slice(&std::fs::read(interop().join("lexicon-invalid.json")).unwrap())
                .unwrap();
        for case in cases.as_array().unwrap() {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "lexicon.json", &case["lexicon"]);
            let code = run(LexCommand::Lint {
                dir: dir.path().to_path_buf(),
            })
            .unwrap();
            assert_eq!(code, ExitCode::FAILURE, "{}", case["name"]);
            let (set, mut issues) = LexiconSet::load_dir_unchecked(dir.path()).unwrap();
            issues.extend(set.lint());
            let text = issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(text.contains("lexicon.json: $"), "{}: {text}", case["name"]);
        }
    }

    #[test]
    fn validate_accepts_interop_valid_records_and_refuses_invalid_ones() {
        let catalog = interop().join("catalog");
        let dir = tempfile::tempdir().unwrap();
        let cases: serde_json::Value = serde_json::from_slice(
            &std::fs::read(interop().join("record-data-valid.json")).unwrap(),
        )
        .unwrap();
        for case in cases.as_array().unwrap() {
            let file = write(dir.path(), "record.json", &case["data"]);
            let code = run(LexCommand::Validate {
                dir: catalog.clone(),
                nsid: "example.lexicon.record".into(),
                file,
            })
            .unwrap();
            assert_eq!(code, ExitCode::SUCCESS, "{}", case["name"]);
        }
        let invalid = [
            json!({"$type": "example.lexicon.record"}),
            json!({"$type": "example.lexicon.record", "integer": 1, "rangeInteger": 99}),
            json!({"$type": "example.lexicon.record", "integer": 1, "formats": {"did": "not-a-did"}}),
            json!({"$type": "example.lexicon.record", "integer": 1, "closedUnion": {"$type": "example.lexicon.record#demoObjectTwo"}}),
            json!({"$type": "example.lexicon.record", "integer": 1.5}),
        ];
        for record in invalid {
            let file = write(dir.path(), "record.json", &record);
            let code = run(LexCommand::Validate {
                dir: catalog.clone(),
                nsid: "example.lexicon.record".into(),
                file,
            })
            .unwrap();
            assert_eq!(code, ExitCode::FAILURE, "{record}");
        }
        // Not JSON at all: refused, no panic.
        let file = dir.path().join("garbage.json");
        std::fs::write(&file, b"{nope").unwrap();
        let code = run(LexCommand::Validate {
            dir: catalog.clone(),
            nsid: "example.lexicon.record".into(),
            file,
        })
        .unwrap();
        assert_eq!(code, ExitCode::FAILURE);
    }

    #[test]
    fn validate_reads_dag_cbor() {
        let dir = tempfile::tempdir().unwrap();
        let record = json!({"$type": "agent.comms.presence", "state": "online", "ttlSeconds": 60, "createdAt": "2026-11-23T22:00:00Z"});
        let data = murmur_lexicon::data::json_to_data(&record).unwrap();
        let file = dir.path().join("presence.cbor");
        std::fs::write(&file, serde_ipld_dagcbor_bytes(&data)).unwrap();
        let code = run(LexCommand::Validate {
            dir: root().join("lexicons"),
            nsid: "agent.comms.presence".into(),
            file,
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
    }

    fn serde_ipld_dagcbor_bytes(data: &murmur_lexicon::data::Ipld) -> Vec<u8> {
        murmur_lexicon::data::to_dag_cbor(data).unwrap()
    }

    #[test]
    fn gen_writes_the_generated_module() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("comms.rs");
        let code = run(LexCommand::Gen {
            dir: root().join("lexicons"),
            out: Some(out.clone()),
            only: vec![],
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        let text = std::fs::read_to_string(out).unwrap();
        assert!(text.contains("pub struct Task;"));
        assert!(text.contains("const NSID: &'static str = \"agent.comms.task\";"));
    }

    #[test]
    fn breaking_detects_a_tightened_constraint() {
        let old = root().join("lexicons");
        assert_eq!(
            run(LexCommand::Breaking {
                old: old.clone(),
                new: old.clone()
            })
            .unwrap(),
            ExitCode::SUCCESS
        );
        let new = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(old.join("agent/comms")).unwrap() {
            let path = entry.unwrap().path();
            let mut value: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if path.file_name().unwrap() == "task.json" {
                value["defs"]["main"]["record"]["properties"]["title"]["maxLength"] = json!(10);
            }
            write(
                new.path(),
                path.file_name().unwrap().to_str().unwrap(),
                &value,
            );
        }
        let code = run(LexCommand::Breaking {
            old,
            new: new.path().to_path_buf(),
        })
        .unwrap();
        assert_eq!(code, ExitCode::FAILURE);
    }
}
