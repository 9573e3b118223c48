//! Everything the README shows about handlers, from a crate whose only dependency is murmur.

use murmur::comms::{Message, Task};
use murmur::firehose::{CommitInfo, RecordRef, Watcher};
use murmur::firehose::Record as Rec; // a renamed import still routes by type
use murmur::{Author, Created, Deleted, HandlerError, OpEvent, State, Updated, handler};

#[derive(Clone)]
struct Db;

#[handler]
async fn on_task(
    task: Created<Task>,
    from: Author,
    at: RecordRef,
    commit: CommitInfo,
    State(_db): State<Db>,
) -> Result<(), HandlerError> {
    println!("{} {} {:?} {} {}", task.task_type, from.0, at.cid, commit.seq, task.cid);
    Ok(())
}

/// The same handler without the attribute: a plain async fn is a handler too.
async fn on_task_plain(
    task: Created<Task>,
    from: Author,
    at: RecordRef,
    commit: CommitInfo,
    State(_db): State<Db>,
) -> Result<(), HandlerError> {
    println!("{} {} {:?} {}", task.task_type, from.0, at.cid, commit.seq);
    Ok(())
}

#[handler]
async fn on_message(msg: Rec<Message>, op: OpEvent) -> Result<(), HandlerError> {
    println!("{:?} {}", msg.text, op.uri());
    Ok(())
}

#[handler]
async fn on_edit(msg: Updated<Message>) -> Result<(), HandlerError> {
    println!("{:?}", msg.text);
    Ok(())
}

fn main() -> Result<(), murmur::firehose::FirehoseError> {
    use murmur::Handler;
    assert_eq!(on_task.name(), "on_task");
    let watcher = Watcher::builder()
        .pds("http://localhost:2583")
        .state(Db)
        .handler(on_task)
        .handler(on_task_plain)
        .handler(on_message)
        .handler(on_edit)
        .handler(|gone: Deleted<Message>, from: Author| async move {
            println!("{} deleted {}", from.0, gone.uri);
            Ok(())
        })
        .build()?;
    drop(watcher);
    Ok(())
}
