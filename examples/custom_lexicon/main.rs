//! Your own coordination vocabulary: `com.example.recipes.*` lexicons in
//! `examples/custom_lexicon/lexicons`, turned into Rust types by `examples/build.rs` with
//! `murmur_lexicon::Builder`, the same way murmur-comms gets the agent.comms.* types.
//!
//! Builds typed records, validates them (an invalid one is refused with its JSON path), and
//! round-trips them through JSON and DAG-CBOR (byte for byte).
//!
//! ```sh
//! cargo run --example custom_lexicon
//! ```

/// The generated `com.example.recipes.*` types.
// A program uses part of a generated vocabulary; in a library crate the items would be `pub`.
#[allow(dead_code)]
mod lexicons {
    include!(concat!(env!("OUT_DIR"), "/custom_lexicon.rs"));
}

use lexicons::com::example::recipes::{Recipe, Review, recipe, review};
use murmur_lexicon::runtime::atrium_api::types::{Collection, Union};
use murmur_lexicon::{LexiconSet, Validate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. A typed record. `into_record()` adds `"$type": "com.example.recipes.recipe"`.
    let soup = recipe::RecordData {
        title: "Pumpkin soup".into(),
        ingredients: vec![
            recipe::IngredientData {
                name: "pumpkin".into(),
                quantity: Some("1 kg".into()),
            }
            .into(),
            recipe::IngredientData {
                name: "vegetable stock".into(),
                quantity: Some("1 l".into()),
            }
            .into(),
        ],
        steps: Some(vec![
            "Roast the pumpkin.".into(),
            "Blend with the stock.".into(),
        ]),
        servings: 4,
        diet: Some(Union::Refs(recipe::RecordDietRefs::Vegan(Box::new(
            recipe::VeganData {}.into(),
        )))),
        created_at: "2026-11-23T12:00:00.000Z".into(),
    }
    .into_record();
    soup.validate()?;
    println!("{} record is valid", Recipe::NSID);

    // 2. An invalid one is refused, naming the JSON path of the problem.
    let mut bad = soup.clone();
    bad.ingredients[1].name = "x".repeat(201);
    let err = bad.validate().unwrap_err();
    println!("refused: {err}");
    assert_eq!(err.path, "$.ingredients[1].name");

    // 3. JSON round trip.
    let json = serde_json::to_string_pretty(&soup)?;
    println!("JSON:\n{json}");
    let back: recipe::Record = serde_json::from_str(&json)?;
    assert_eq!(back, soup);

    // 4. DAG-CBOR round trip, byte for byte (this is how records sit in a repo).
    let cbor = serde_ipld_dagcbor::to_vec(&soup)?;
    let decoded: recipe::Record = serde_ipld_dagcbor::from_slice(&cbor)?;
    assert_eq!(serde_ipld_dagcbor::to_vec(&decoded)?, cbor);
    println!("DAG-CBOR: {} bytes, round trip identical", cbor.len());

    // 5. Records from other agents arrive as JSON or DAG-CBOR: the runtime validator checks
    //    them against the same lexicon files, and keeps fields this version does not know.
    let lexicons = LexiconSet::load_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/custom_lexicon/lexicons"
    ))?;
    let incoming = serde_json::json!({
        "$type": Review::NSID,
        "recipe": { "uri": "at://did:plc:chef/com.example.recipes.recipe/3kznmn7xqxl22",
                    "cid": "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq" },
        "stars": 6,
        "createdAt": "2026-11-23T13:00:00Z",
        "mood": "hungry"
    });
    let errors = lexicons
        .validate_record_json(Review::NSID, &incoming)
        .unwrap_err();
    println!("incoming review refused: {}", errors[0]);
    let review: review::Record = serde_json::from_value(incoming)?;
    assert_eq!(review.validate().unwrap_err().path, "$.stars");
    assert_eq!(serde_json::to_value(&review)?["mood"], "hungry");
    Ok(())
}
