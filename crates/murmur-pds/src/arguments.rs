//! Checks of the identifiers callers pass (NSIDs, DIDs, record keys), before any HTTP call.

use atrium_api::types::string::{AtIdentifier, Did, Nsid, RecordKey};

use crate::{Error, Result};

/// Checks an NSID argument.
pub(crate) fn nsid(s: &str) -> Result<Nsid> {
    Nsid::new(s.to_string()).map_err(|e| Error::InvalidArgument {
        what: "NSID",
        message: format!("{s:?}: {e}"),
    })
}

/// Checks a DID argument.
pub(crate) fn did_identifier(did: &str) -> Result<AtIdentifier> {
    Ok(AtIdentifier::Did(Did::new(did.to_string()).map_err(
        |e| Error::InvalidArgument {
            what: "DID",
            message: format!("{did:?}: {e}"),
        },
    )?))
}

/// Checks a record key argument.
pub(crate) fn record_key(s: &str) -> Result<RecordKey> {
    RecordKey::new(s.to_string()).map_err(|e| Error::InvalidArgument {
        what: "record key",
        message: format!("{s:?}: {e}"),
    })
}
