use atrium_api::types::Collection;
use murmur_firehose::{handler, Author, CommitInfo, Deleted, HandlerError, OpEvent, Record, RecordRef, State};

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

#[derive(Clone)]
struct Db;

#[handler]
async fn on_note(
    note: Record<Note>,
    from: Author,
    at: RecordRef,
    commit: CommitInfo,
    State(_db): State<Db>,
    op: OpEvent,
) -> Result<(), HandlerError> {
    let _ = (&note.text, from, at, commit, op);
    Ok(())
}

#[handler(create)]
async fn on_new_note(_note: Record<Note>) -> Result<(), HandlerError> {
    Ok(())
}

#[handler]
async fn on_gone(gone: Deleted<Note>) -> Result<(), HandlerError> {
    let _ = gone.prev;
    Ok(())
}

fn main() {
    use murmur_firehose::Handler;
    assert_eq!(on_note.route().collection, "test.murmur.note");
    assert_eq!(on_note.required_state().len(), 1);
    assert_eq!(on_new_note.route().actions, &[murmur_firehose::Action::Create]);
    assert_eq!(on_gone.route().actions, &[murmur_firehose::Action::Delete]);
    let _ = murmur_firehose::Watcher::builder()
        .pds("http://localhost:1")
        .state(Db)
        .handler(on_note)
        .handler(on_new_note)
        .handler(on_gone);
}
