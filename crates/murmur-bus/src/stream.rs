//! The JetStream stream the hub writes and consumers read, and its dead-letter stream.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::BusError;
use crate::subject::{DEFAULT_PARTITIONS, DEFAULT_PREFIX, Subjects};

/// How the bus's stream is laid out and kept. Hub and consumers must agree on `name` and
/// `prefix`; the partition count is read from the stream by consumers.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Stream name (default `MURMUR`).
    pub name: String,
    /// Subject prefix (default `murmur`).
    pub prefix: String,
    /// Partitions, for pools (default 16).
    pub partitions: u16,
    /// Replicas (1, or 3 on a cluster).
    pub replicas: usize,
    /// How long messages are kept: the replay window (default 24 h).
    pub max_age: Duration,
    /// The window in which a message id is stored once (default 10 min): a restarted hub, or
    /// a second hub, that republishes an op within it does not store it twice.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            name: "MURMUR".into(),
            prefix: DEFAULT_PREFIX.into(),
            partitions: DEFAULT_PARTITIONS,
            replicas: 1,
            max_age: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(600),
        }
    }
}

/// The description a bus stream carries: consumers read the partition count from it.
const DESCRIPTION: &str = "murmur bus v1: verified atproto ops with proofs; partitions=";

impl StreamSettings {
    /// The subject layout.
    pub fn subjects(&self) -> Result<Subjects, BusError> {
        Subjects::new(&self.prefix, self.partitions).map_err(|e| BusError::Config(e.to_string()))
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DEAD", self.name)
    }

    /// The dead-letter subject of one consumer.
    pub fn dead_letter_subject(&self, consumer: &str) -> String {
        format!(
            "{}-dead.{}",
            self.prefix,
            consumer.replace(['.', '*', '>', ' '], "_")
        )
    }

    /// The frame stream's name (`{name}_FRAMES`): the original frames of the verified events,
    /// which the hub's relay serves, numbered by this stream's sequence.
    pub fn frame_stream(&self) -> String {
        format!("{}_FRAMES", self.name)
    }

    /// The key-value bucket of the hub's cursors.
    pub fn cursor_bucket(&self) -> String {
        format!("{}_HUB", self.name)
    }
}

/// Connects to NATS (`nats://host:port`, or several comma-separated for a cluster) and checks
/// the server is new enough ([`MIN_SERVER_VERSION`]).
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, BusError> {
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
        .await
        .map_err(|e| BusError::Connect {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    check_server_version(&client, url)?;
    Ok(client)
}

/// Deletes everything a bus of these settings keeps in the server: the stream, its dead-letter
/// stream and the hubs' cursor bucket (for runs of their own, such as a demo or a test).
/// Each is tried; what is already gone is not an error; the first other failure is returned.
pub async fn delete_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(), BusError> {
    let mut first_error = None;
    for name in [
        settings.name.clone(),
        settings.dead_letter_stream(),
        settings.frame_stream(),
    ] {
        if let Err(e) = js.delete_stream(&name).await
            && !is_not_found(&e)
        {
            first_error.get_or_insert(BusError::js(format!("delete stream {name}"), e));
        }
    }
    let bucket = settings.cursor_bucket();
    if let Err(e) = js.delete_key_value(&bucket).await
        && !is_not_found(&e)
    {
        first_error.get_or_insert(BusError::js(format!("delete key-value bucket {bucket}"), e));
    }
    first_error.map_or(Ok(()), Err)
}

/// Whether the server said the stream or bucket does not exist.
fn is_not_found(e: &dyn std::fmt::Display) -> bool {
    e.to_string().contains("not found")
}

/// Creates the stream (and its dead-letter stream) if missing, or checks that the one there
/// is a bus stream with this prefix. Returns its subject layout.
pub async fn ensure_streams(
    js: &jetstream::Context,
    settings: &StreamSettings,
    max_payload: usize,
) -> Result<Subjects, BusError> {
    let subjects = settings.subjects()?;
    let config = stream::Config {
        name: settings.name.clone(),
        description: Some(format!("{DESCRIPTION}{}", settings.partitions)),
        subjects: vec![subjects.all()],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: settings.max_age,
        duplicate_window: settings.duplicate_window.min(settings.max_age),
        max_message_size: i32::try_from(max_payload).unwrap_or(i32::MAX),
        ..Default::default()
    };
    let mut existing = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| BusError::js(format!("create stream {}", settings.name), e))?;
    let info = existing
        .info()
        .await
        .map_err(|e| BusError::js(format!("stream info {}", settings.name), e))?;
    if !info.config.subjects.contains(&subjects.all()) {
        return Err(BusError::StreamMismatch {
            stream: settings.name.clone(),
            reason: format!(
                "it stores {:?}, not {}: another prefix, or not a bus stream",
                info.config.subjects,
                subjects.all()
            ),
        });
    }
    let partitions =
        partitions_of(info.config.description.as_deref()).unwrap_or(settings.partitions);
    let dead = stream::Config {
        name: settings.dead_letter_stream(),
        description: Some("murmur bus dead letters: ops whose handlers failed for good".into()),
        subjects: vec![format!("{}-dead.>", settings.prefix)],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: Duration::from_secs(14 * 24 * 3600),
        ..Default::default()
    };
    js.get_or_create_stream(dead).await.map_err(|e| {
        BusError::js(
            format!("create stream {}", settings.dead_letter_stream()),
            e,
        )
    })?;
    Subjects::new(&settings.prefix, partitions).map_err(|e| BusError::Config(e.to_string()))
}

/// Creates the frame stream (see [`StreamSettings::frame_stream`]) if missing: the same
/// replicas, replay window and duplicate window as the bus stream.
pub async fn ensure_frame_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
    subjects: &Subjects,
    max_payload: usize,
) -> Result<(), BusError> {
    let config = stream::Config {
        name: settings.frame_stream(),
        description: Some("murmur relay: original subscribeRepos frames of verified events".into()),
        subjects: vec![subjects.frames_all()],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: settings.max_age,
        duplicate_window: settings.duplicate_window.min(settings.max_age),
        max_message_size: i32::try_from(max_payload).unwrap_or(i32::MAX),
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| BusError::js(format!("create stream {}", settings.frame_stream()), e))?;
    Ok(())
}

/// Reads the layout of an existing bus stream (consumers do not create it).
pub async fn open_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Subjects, BusError> {
    let mut stream = js
        .get_stream(&settings.name)
        .await
        .map_err(|e| BusError::js(format!("get stream {}", settings.name), e))?;
    let info = stream
        .info()
        .await
        .map_err(|e| BusError::js(format!("stream info {}", settings.name), e))?;
    let partitions = partitions_of(info.config.description.as_deref()).ok_or_else(|| {
        BusError::StreamMismatch {
            stream: settings.name.clone(),
            reason: "not a bus stream (its description does not name its partitions)".into(),
        }
    })?;
    Subjects::new(&settings.prefix, partitions).map_err(|e| BusError::Config(e.to_string()))
}

fn partitions_of(description: Option<&str>) -> Option<u16> {
    description?.strip_prefix(DESCRIPTION)?.trim().parse().ok()
}

/// The oldest nats-server the bus works with: consumers with several filter subjects and the
/// key-value API as async-nats speaks it need 2.10.
pub const MIN_SERVER_VERSION: (u32, u32) = (2, 10);

/// Fails with a clear error when the connected server is older than [`MIN_SERVER_VERSION`].
pub fn check_server_version(client: &async_nats::Client, url: &str) -> Result<(), BusError> {
    let version = client.server_info().version;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= MIN_SERVER_VERSION {
        return Ok(());
    }
    Err(BusError::Config(format!(
        "the NATS server at {url} is {version}; the bus needs nats-server {}.{} or later (murmur-devnet installs 2.15 on first use: murmur_devnet::nats::NatsServer)",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
    )))
}
