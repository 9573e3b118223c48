//! Account creation for the examples: local and test PDS hosts accept sign-ups without an
//! invite code.

use murmur::pds::Writer;

/// Creates a fresh account named after `name` on `pds` and logs in as it.
pub async fn account(pds: &str, name: &str) -> Result<Writer, Box<dyn std::error::Error>> {
    // The PDS takes short first labels only: at most 8 letters of the name plus 6 hex digits.
    let suffix = fastrand::u32(..0x0100_0000);
    let short_name: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let handle = format!("{short_name}{suffix:06x}.test");
    let password = format!("example-{:016x}", fastrand::u64(..));
    let res = reqwest::Client::new()
        .post(format!("{pds}/xrpc/com.atproto.server.createAccount"))
        .json(&serde_json::json!({
            "handle": handle,
            "email": format!("{short_name}{suffix:06x}@example.test"),
            "password": password,
        }))
        .send()
        .await?;
    if !res.status().is_success() {
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        return Err(format!(
            "creating an account on {pds} failed ({status}): {body}; \
             does this PDS accept sign-ups without an invite code?"
        )
        .into());
    }
    let body: serde_json::Value = res.json().await?;
    let did = body["did"]
        .as_str()
        .ok_or("createAccount answered without a did")?;
    Ok(Writer::login(pds, did, &password).await?)
}
