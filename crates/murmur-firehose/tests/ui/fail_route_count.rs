use atrium_api::types::Collection;
use murmur_firehose::{handler, Author, Deleted, HandlerError, Record as R};

#[derive(Debug)]
struct Note;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct NoteRecord {
    text: String,
}

impl Collection for Note {
    const NSID: &'static str = "test.murmur.note";
    type Record = NoteRecord;
}

impl murmur_lexicon::Validate for NoteRecord {
    fn validate(&self) -> Result<(), murmur_lexicon::ValidationError> {
        Ok(())
    }
}

#[handler]
async fn on_anything(from: Author) -> Result<(), HandlerError> {
    let _ = from;
    Ok(())
}

#[handler]
async fn on_both(note: R<Note>, gone: Deleted<Note>) -> Result<(), HandlerError> {
    let _ = (note, gone);
    Ok(())
}

fn main() {}
