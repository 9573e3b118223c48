//! Rust code generation from a lexicon set, driven from build.rs (feature `codegen`).
//!
//! Output follows atrium-api's conventions: for each record NSID `a.b.c`, module `a::b::c`
//! holds `RecordData` (the fields) and `Record = Object<RecordData>` (the fields plus any
//! unknown ones, kept on round trip), and module `a::b` holds a marker type `C` implementing
//! atrium-api's `Collection`. Object definitions `foo` become `FooData` / `Foo`; unions become
//! `$type`-tagged enums (open ones wrapped in atrium's `Union`, whose `Unknown` variant keeps
//! the raw data); tokens become string constants. Every generated struct and enum implements
//! [`Validate`](crate::Validate) with checks generated from its constraints.
//!
//! Definitions may refer to each other in cycles: a field that refers directly (not through
//! an array or a union) to an object holding its own struct again is a `Box`, so a tree node
//! can hold its parent. A cycle made only of non-object definitions (`b: array of #c`,
//! `c: array of #b`) would be an infinite `type` alias and is refused with
//! [`LexiconError::RefCycle`](crate::LexiconError::RefCycle).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote};

use crate::cycles::{self, Graph};
use crate::schema::{FieldType, LexiconDoc, ObjectType, StringType, UserType};
use crate::set::split_ref;
use crate::syntax::StringFormat;
use crate::{LexiconError, LexiconSet};

/// Generates Rust types from lexicon directories, for use in build.rs.
///
/// ```no_run
/// // build.rs
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     murmur_lexicon::Builder::new()
///         .lexicon_dir("lexicons")
///         .generate()?; // writes $OUT_DIR/lexicons.rs
///     Ok(())
/// }
/// ```
///
/// and in the crate: `include!(concat!(env!("OUT_DIR"), "/lexicons.rs"));`. The crate needs
/// `murmur-lexicon` as a dependency (generated code reaches serde and atrium-api through it).
#[derive(Debug, Clone)]
pub struct Builder {
    dirs: Vec<PathBuf>,
    out_dir: Option<PathBuf>,
    file_name: String,
    only: Vec<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// A builder with no lexicon directory yet, writing `lexicons.rs` into `$OUT_DIR`.
    pub fn new() -> Self {
        Builder {
            dirs: Vec::new(),
            out_dir: None,
            file_name: "lexicons.rs".into(),
            only: Vec::new(),
        }
    }

    /// Adds a directory of lexicon JSON files (searched recursively).
    pub fn lexicon_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dirs.push(dir.into());
        self
    }

    /// Where to write the generated file (default: the `OUT_DIR` cargo gives build scripts).
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// The generated file's name (default `lexicons.rs`).
    pub fn file_name(mut self, name: impl Into<String>) -> Self {
        self.file_name = name.into();
        self
    }

    /// Generates only NSIDs starting with `prefix` (e.g. `com.example.recipes.`); may be
    /// called several times. Other lexicons still resolve refs.
    pub fn only(mut self, prefix: impl Into<String>) -> Self {
        self.only.push(prefix.into());
        self
    }

    /// Loads and lints the lexicons, returning the generated source.
    pub fn generate_string(&self) -> Result<String, LexiconError> {
        let mut set = LexiconSet::new();
        let mut issues = Vec::new();
        for dir in &self.dirs {
            let (part, mut part_issues) = LexiconSet::load_dir_unchecked(dir)?;
            issues.append(&mut part_issues);
            for doc in part.docs() {
                let file = part.file(&doc.id).map(Path::to_path_buf);
                if let Err(issue) = set.insert(doc.clone(), file.as_deref()) {
                    issues.push(issue);
                }
            }
        }
        issues.extend(set.lint());
        if !issues.is_empty() {
            return Err(LexiconError::Lint(issues));
        }
        generate(&set, &self.only)
    }

    /// Generates and writes `<out_dir>/<file_name>`, returning its path. Inside a build script
    /// it also tells cargo to rerun when a lexicon directory changes.
    pub fn generate(self) -> Result<PathBuf, LexiconError> {
        let code = self.generate_string()?;
        let out_dir = match &self.out_dir {
            Some(dir) => dir.clone(),
            None => std::env::var_os("OUT_DIR")
                .map(PathBuf::from)
                .ok_or_else(|| LexiconError::Codegen {
                    what: "output".into(),
                    why: "OUT_DIR is not set; call .out_dir(..) or run from build.rs".into(),
                })?,
        };
        std::fs::create_dir_all(&out_dir).map_err(|source| LexiconError::Io {
            path: out_dir.clone(),
            source,
        })?;
        let path = out_dir.join(&self.file_name);
        std::fs::write(&path, code).map_err(|source| LexiconError::Io {
            path: path.clone(),
            source,
        })?;
        if std::env::var_os("CARGO_MANIFEST_DIR").is_some() && std::env::var_os("OUT_DIR").is_some()
        {
            for dir in &self.dirs {
                println!("cargo:rerun-if-changed={}", dir.display());
            }
        }
        Ok(path)
    }
}

/// Generates Rust source for every document of `set` whose NSID starts with one of `only`
/// (all when `only` is empty).
pub fn generate(set: &LexiconSet, only: &[String]) -> Result<String, LexiconError> {
    let mut root = Node::default();
    for doc in set.docs() {
        if !only.is_empty() && !only.iter().any(|p| doc.id.starts_with(p.as_str())) {
            continue;
        }
        let mut node = &mut root;
        for seg in doc.id.split('.') {
            node = node.children.entry(seg.to_owned()).or_default();
        }
        node.doc = Some(doc);
    }
    // `type B = Vec<C>; type C = Vec<B>;` is an infinite type: refuse it (lint does too).
    if let Some(cycle) = cycles::alias_graph(set).cycles().into_iter().next() {
        return Err(LexiconError::RefCycle {
            cycle,
            why: cycles::ALIAS_CYCLE_WHY.into(),
        });
    }
    let generator = Gen {
        set,
        containment: cycles::containment_graph(set),
    };
    let mut items = Vec::new();
    for (name, child) in &root.children {
        items.push(generator.node(name, child, &[])?);
    }
    let file: syn::File =
        syn::parse2(quote! { #(#items)* }).map_err(|e| LexiconError::Codegen {
            what: "generated code".into(),
            why: format!("does not parse as Rust ({e}); this is a murmur-lexicon bug"),
        })?;
    let header =
        "// @generated by murmur-lexicon from lexicon JSON. Do not edit: change the lexicons.\n\n";
    Ok(format!("{header}{}", prettyplease::unparse(&file)))
}

#[derive(Default)]
struct Node<'d> {
    doc: Option<&'d LexiconDoc>,
    children: BTreeMap<String, Node<'d>>,
}

struct Gen<'s> {
    set: &'s LexiconSet,
    /// Objects and records to those they hold directly; a field closing a cycle is boxed.
    containment: Graph,
}

/// The generated item that owns a nested type, to name unions and inline objects.
struct Ctx<'a> {
    nsid: &'a str,
    /// The top-level definition being generated, as canonical `nsid#name`.
    def: &'a str,
    owner: String,
}

impl Gen<'_> {
    fn node(
        &self,
        name: &str,
        node: &Node<'_>,
        parents: &[String],
    ) -> Result<TokenStream, LexiconError> {
        let mut path: Vec<String> = parents.to_vec();
        path.push(name.to_owned());
        let module = module_ident(name);
        let mut items = Vec::new();
        let doc = match node.doc {
            Some(d) => {
                items.extend(self.document(d)?);
                doc_attrs(&format!(
                    "`{}`{}",
                    d.id,
                    d.description
                        .as_deref()
                        .map(|s| format!(": {s}"))
                        .unwrap_or_else(|| " definitions.".into())
                ))
            }
            None => doc_attrs(&format!("The `{}` namespace.", path.join("."))),
        };
        for (child_name, child) in &node.children {
            if let Some(child_doc) = child.doc
                && let Some(UserType::Record(record)) = child_doc.defs.get("main")
            {
                let marker = type_ident(child_name);
                let child_mod = module_ident(child_name);
                let nsid = &child_doc.id;
                let text = format!(
                    "The `{nsid}` collection (record key: `{}`).{}",
                    record.key.as_string(),
                    record
                        .description
                        .as_deref()
                        .map(|d| format!("\n\n{d}"))
                        .unwrap_or_default()
                );
                let docs = doc_attrs(&text);
                items.push(quote! {
                    #docs
                    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
                    pub struct #marker;
                    impl ::murmur_lexicon::runtime::atrium_api::types::Collection for #marker {
                        const NSID: &'static str = #nsid;
                        type Record = #child_mod::Record;
                    }
                });
            }
            items.push(self.node(child_name, child, &path)?);
        }
        Ok(quote! {
            #doc
            pub mod #module {
                #(#items)*
            }
        })
    }

    fn document(&self, doc: &LexiconDoc) -> Result<Vec<TokenStream>, LexiconError> {
        let mut items = Vec::new();
        for (name, def) in &doc.defs {
            let what = format!("{}#{name}", doc.id);
            match def {
                UserType::Record(record) => {
                    let ctx = Ctx {
                        nsid: &doc.id,
                        def: &what,
                        owner: "Record".into(),
                    };
                    let desc = record
                        .description
                        .clone()
                        .unwrap_or_else(|| format!("A `{}` record.", doc.id));
                    items.extend(self.object("Record", &desc, &record.record, &ctx, &what)?);
                    let nsid = &doc.id;
                    items.push(quote! {
                        impl RecordData {
                            /// The record type's NSID, also its `$type`.
                            pub const NSID: &'static str = #nsid;

                            /// Wraps the fields into a [`Record`] carrying `"$type"`, ready to write.
                            pub fn into_record(self) -> Record {
                                let mut extra = ::std::collections::BTreeMap::new();
                                extra.insert(
                                    "$type".to_owned(),
                                    ::murmur_lexicon::runtime::ipld_core::ipld::Ipld::String(Self::NSID.to_owned()),
                                );
                                Record { data: self, extra_data: ::murmur_lexicon::runtime::ipld_core::ipld::Ipld::Map(extra) }
                            }
                        }
                    });
                }
                UserType::Token(token) => {
                    let ident = Ident::new(&screaming(name), Span::call_site());
                    let value = if name == "main" {
                        doc.id.clone()
                    } else {
                        format!("{}#{name}", doc.id)
                    };
                    let docs = doc_attrs(
                        token
                            .description
                            .as_deref()
                            .unwrap_or(&format!("The token `{value}`.")),
                    );
                    items.push(quote! { #docs pub const #ident: &str = #value; });
                }
                UserType::Type(FieldType::Object(object)) => {
                    let base = type_name(name);
                    let ctx = Ctx {
                        nsid: &doc.id,
                        def: &what,
                        owner: base.clone(),
                    };
                    let desc = object
                        .description
                        .clone()
                        .unwrap_or_else(|| format!("`{what}`."));
                    items.extend(self.object(&base, &desc, object, &ctx, &what)?);
                }
                UserType::Type(other) => {
                    let ident = type_ident(name);
                    let ctx = Ctx {
                        nsid: &doc.id,
                        def: &what,
                        owner: type_name(name),
                    };
                    let (ty, extra) = self.rust_type(other, &ctx, &type_name(name), &what)?;
                    items.extend(extra);
                    let mut text = other
                        .description()
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("`{what}`."));
                    if let FieldType::String(StringType { known_values, .. }) = other
                        && !known_values.is_empty()
                    {
                        text.push_str(&format!(
                            "\n\nKnown values: {}.",
                            known_values
                                .iter()
                                .map(|v| format!("`{v}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    let docs = doc_attrs(&text);
                    items.push(quote! { #docs pub type #ident = #ty; });
                }
                UserType::Query(_)
                | UserType::Procedure(_)
                | UserType::Subscription(_)
                | UserType::PermissionSet(_) => {
                    let kind = match def {
                        UserType::Query(_) => "XRPC query",
                        UserType::Procedure(_) => "XRPC procedure",
                        UserType::Subscription(_) => "XRPC subscription",
                        _ => "permission set",
                    };
                    let nsid = &doc.id;
                    let docs = doc_attrs(&format!("The {kind} `{nsid}`."));
                    items.push(quote! { #docs pub const NSID: &str = #nsid; });
                }
            }
        }
        Ok(items)
    }

    /// `{base}Data` struct + `{base}` alias + `Validate`, plus nested unions/objects.
    fn object(
        &self,
        base: &str,
        description: &str,
        object: &ObjectType,
        ctx: &Ctx<'_>,
        what: &str,
    ) -> Result<Vec<TokenStream>, LexiconError> {
        let data = format_ident!("{base}Data");
        let alias = format_ident!("{base}");
        let mut items = Vec::new();
        let mut fields = Vec::new();
        let mut checks = Vec::new();
        for (name, ty) in &object.properties {
            if name.starts_with('$') {
                continue;
            }
            let field = field_ident(name);
            let fctx = Ctx {
                nsid: ctx.nsid,
                def: ctx.def,
                owner: format!("{}{}", ctx.owner, type_name(name)),
            };
            let (mut rust, extra) =
                self.rust_type(ty, &fctx, &fctx.owner, &format!("{what}.{name}"))?;
            items.extend(extra);
            if self.closes_cycle(ty, ctx) {
                rust = quote!(::std::boxed::Box<#rust>);
            }
            let required = object.required.contains(name);
            let nullable = object.nullable.contains(name);
            let mut text = ty
                .description()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("`{name}`."));
            if let FieldType::String(StringType { known_values, .. }) = ty
                && !known_values.is_empty()
            {
                text.push_str(&format!(
                    "\n\nKnown values: {}.",
                    known_values
                        .iter()
                        .map(|v| format!("`{v}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let docs = doc_attrs(&text);
            let field_checks = self.checks(ty, ctx.nsid, quote!(value), 0)?;
            let fname = name.as_str();
            if required && !nullable {
                fields.push(quote! {
                    #docs
                    #[serde(rename = #fname)]
                    pub #field: #rust,
                });
                if !field_checks.is_empty() {
                    checks.push(quote! {
                        {
                            let path = ::murmur_lexicon::check::field(path, #fname);
                            let value = &self.#field;
                            #field_checks
                        }
                    });
                }
            } else {
                let serde_attr = if required {
                    quote! { #[serde(rename = #fname)] }
                } else {
                    quote! { #[serde(rename = #fname, default, skip_serializing_if = "::core::option::Option::is_none")] }
                };
                fields.push(quote! {
                    #docs
                    #serde_attr
                    pub #field: ::core::option::Option<#rust>,
                });
                if !field_checks.is_empty() {
                    checks.push(quote! {
                        if let ::core::option::Option::Some(value) = &self.#field {
                            let path = ::murmur_lexicon::check::field(path, #fname);
                            #field_checks
                        }
                    });
                }
            }
        }
        let docs = doc_attrs(description);
        let alias_docs = doc_attrs(&format!(
            "[`{base}Data`] plus any fields this version of the lexicon does not know (kept on round trip)."
        ));
        let unused = if checks.is_empty() {
            quote! { let _ = path; }
        } else {
            quote! {}
        };
        items.push(quote! {
            #docs
            #[derive(Debug, Clone, PartialEq, ::murmur_lexicon::runtime::serde::Serialize, ::murmur_lexicon::runtime::serde::Deserialize)]
            #[serde(crate = "::murmur_lexicon::runtime::serde")]
            pub struct #data {
                #(#fields)*
            }
            #alias_docs
            pub type #alias = ::murmur_lexicon::runtime::atrium_api::types::Object<#data>;
            impl ::murmur_lexicon::Validate for #data {
                fn validate(&self) -> ::core::result::Result<(), ::murmur_lexicon::ValidationError> {
                    self.validate_at("$")
                }
                fn validate_at(&self, path: &str) -> ::core::result::Result<(), ::murmur_lexicon::ValidationError> {
                    #unused
                    #(#checks)*
                    ::core::result::Result::Ok(())
                }
            }
        });
        Ok(items)
    }

    /// Whether field type `ty` of an object inside `ctx.def` refers (directly, not through an
    /// array or a union) to a struct that holds `ctx.def` again: such a field is boxed, or
    /// the struct would be infinitely large.
    fn closes_cycle(&self, ty: &FieldType, ctx: &Ctx<'_>) -> bool {
        let FieldType::Ref(r) = ty else {
            return false;
        };
        match self.set.resolve(&r.reference, ctx.nsid) {
            Some((full, UserType::Record(_) | UserType::Type(FieldType::Object(_)))) => {
                full == ctx.def || self.containment.reach(&full).contains(ctx.def)
            }
            _ => false,
        }
    }

    /// The Rust type of a field, plus the items (unions, inline objects) it needs.
    fn rust_type(
        &self,
        ty: &FieldType,
        ctx: &Ctx<'_>,
        owner: &str,
        what: &str,
    ) -> Result<(TokenStream, Vec<TokenStream>), LexiconError> {
        let atrium = quote!(::murmur_lexicon::runtime::atrium_api);
        Ok(match ty {
            FieldType::Boolean(_) => (quote!(bool), vec![]),
            FieldType::Integer(_) => (quote!(i64), vec![]),
            FieldType::String(_) => (quote!(::std::string::String), vec![]),
            FieldType::Bytes(_) => (quote!(::murmur_lexicon::data::Bytes), vec![]),
            FieldType::CidLink(_) => (quote!(#atrium::types::CidLink), vec![]),
            FieldType::Blob(_) => (quote!(#atrium::types::BlobRef), vec![]),
            FieldType::Unknown(_) => (quote!(#atrium::types::Unknown), vec![]),
            FieldType::Array(a) => {
                let (item, extra) = self.rust_type(&a.items, ctx, owner, what)?;
                (quote!(::std::vec::Vec<#item>), extra)
            }
            FieldType::Object(o) => {
                let ident = format_ident!("{owner}");
                let octx = Ctx {
                    nsid: ctx.nsid,
                    def: ctx.def,
                    owner: owner.to_owned(),
                };
                let desc = o
                    .description
                    .clone()
                    .unwrap_or_else(|| format!("The object at `{what}`."));
                (quote!(#ident), self.object(owner, &desc, o, &octx, what)?)
            }
            FieldType::Ref(r) => (self.ref_path(&r.reference, ctx.nsid, what)?, vec![]),
            FieldType::Union(u) => {
                let name = format_ident!("{owner}Refs");
                let mut variants = Vec::new();
                let mut arms = Vec::new();
                for r in &u.refs {
                    let (nsid, def) = split_ref(r, ctx.nsid);
                    let tag = if def == "main" {
                        nsid.to_owned()
                    } else {
                        format!("{nsid}#{def}")
                    };
                    let variant = if nsid == ctx.nsid {
                        type_ident(def)
                    } else {
                        format_ident!(
                            "{}{}",
                            type_name(&nsid.replace('.', "_")),
                            if def == "main" {
                                String::new()
                            } else {
                                type_name(def)
                            }
                        )
                    };
                    let target = self.ref_path(r, ctx.nsid, what)?;
                    let docs = doc_attrs(&format!("`{tag}`."));
                    variants.push(quote! {
                        #docs
                        #[serde(rename = #tag)]
                        #variant(::std::boxed::Box<#target>),
                    });
                    arms.push(quote! { Self::#variant(value) => ::murmur_lexicon::Validate::validate_at(value, path), });
                }
                let docs = doc_attrs(&format!(
                    "{} union at `{what}`, told apart by `$type`.{}",
                    if u.closed {
                        "The closed"
                    } else {
                        "The members of the open"
                    },
                    u.description
                        .as_deref()
                        .map(|d| format!("\n\n{d}"))
                        .unwrap_or_default()
                ));
                let item = quote! {
                    #docs
                    #[derive(Debug, Clone, PartialEq, ::murmur_lexicon::runtime::serde::Serialize, ::murmur_lexicon::runtime::serde::Deserialize)]
                    #[serde(crate = "::murmur_lexicon::runtime::serde", tag = "$type")]
                    pub enum #name {
                        #(#variants)*
                    }
                    impl ::murmur_lexicon::Validate for #name {
                        fn validate(&self) -> ::core::result::Result<(), ::murmur_lexicon::ValidationError> {
                            self.validate_at("$")
                        }
                        fn validate_at(&self, path: &str) -> ::core::result::Result<(), ::murmur_lexicon::ValidationError> {
                            match self {
                                #(#arms)*
                            }
                        }
                    }
                };
                let ty = if u.closed {
                    quote!(#name)
                } else {
                    quote!(#atrium::types::Union<#name>)
                };
                (ty, vec![item])
            }
        })
    }

    /// Rust path to the type a reference names, from inside the module of `from`.
    fn ref_path(
        &self,
        reference: &str,
        from: &str,
        what: &str,
    ) -> Result<TokenStream, LexiconError> {
        let (nsid, def) = split_ref(reference, from);
        let Some((_, target)) = self.set.resolve(reference, from) else {
            return Err(LexiconError::Codegen {
                what: what.into(),
                why: format!("reference {reference:?} does not resolve"),
            });
        };
        if self.set.is_builtin(nsid) {
            return match (nsid, def) {
                ("com.atproto.repo.strongRef", "main") => Ok(quote!(
                    ::murmur_lexicon::runtime::atrium_api::com::atproto::repo::strong_ref::Main
                )),
                _ => Err(LexiconError::Codegen {
                    what: what.into(),
                    why: format!("no Rust mapping for {reference}"),
                }),
            };
        }
        let item = match target {
            UserType::Record(_) => format_ident!("Record"),
            UserType::Type(_) => type_ident(def),
            _ => {
                return Err(LexiconError::Codegen {
                    what: what.into(),
                    why: format!("{reference} is not a data type"),
                });
            }
        };
        if nsid == from {
            return Ok(quote!(#item));
        }
        let up = from.split('.').map(|_| quote!(super));
        let down = nsid.split('.').map(module_ident);
        Ok(quote!(#(#up::)* #(#down::)* #item))
    }

    /// Statements checking `value` (a reference) at `&path` (a `String`).
    fn checks(
        &self,
        ty: &FieldType,
        nsid: &str,
        value: TokenStream,
        depth: usize,
    ) -> Result<TokenStream, LexiconError> {
        let c = quote!(::murmur_lexicon::check);
        Ok(match ty {
            FieldType::Boolean(t) => match t.const_value {
                Some(v) => {
                    quote! { #c::boolean(*#value, &path, ::core::option::Option::Some(#v))?; }
                }
                None => quote! {},
            },
            FieldType::Integer(t) => {
                let mut rules = Vec::new();
                if let Some(v) = t.minimum {
                    rules.push(quote!(minimum: ::core::option::Option::Some(#v),));
                }
                if let Some(v) = t.maximum {
                    rules.push(quote!(maximum: ::core::option::Option::Some(#v),));
                }
                if let Some(v) = &t.enum_values {
                    rules.push(quote!(enum_values: &[#(#v),*],));
                }
                if let Some(v) = t.const_value {
                    rules.push(quote!(const_value: ::core::option::Option::Some(#v),));
                }
                if rules.is_empty() {
                    quote! {}
                } else {
                    quote! { #c::integer(*#value, &path, &#c::IntegerRules { #(#rules)* ..#c::IntegerRules::NONE })?; }
                }
            }
            FieldType::String(t) => {
                let mut rules = Vec::new();
                if let Some(f) = t.format {
                    let variant = format_ident!("{}", format_variant(f));
                    rules.push(
                        quote!(format: ::core::option::Option::Some(#c::StringFormat::#variant),),
                    );
                }
                for (key, v) in [
                    ("min_length", t.min_length),
                    ("max_length", t.max_length),
                    ("min_graphemes", t.min_graphemes),
                    ("max_graphemes", t.max_graphemes),
                ] {
                    if let Some(v) = v {
                        let key = format_ident!("{key}");
                        rules.push(quote!(#key: ::core::option::Option::Some(#v),));
                    }
                }
                if let Some(v) = &t.enum_values {
                    rules.push(quote!(enum_values: &[#(#v),*],));
                }
                if let Some(v) = &t.const_value {
                    rules.push(quote!(const_value: ::core::option::Option::Some(#v),));
                }
                if rules.is_empty() {
                    quote! {}
                } else {
                    quote! { #c::string(#value, &path, &#c::StringRules { #(#rules)* ..#c::StringRules::NONE })?; }
                }
            }
            FieldType::Bytes(t) if t.min_length.is_some() || t.max_length.is_some() => {
                let (min, max) = (opt(t.min_length), opt(t.max_length));
                quote! { #c::length(#value.0.len(), &path, #min, #max)?; }
            }
            FieldType::Blob(t) if t.accept.is_some() || t.max_size.is_some() => {
                let accept = t.accept.clone().unwrap_or_default();
                let max = opt(t.max_size);
                quote! { #c::blob(#value, &path, &[#(#accept),*], #max)?; }
            }
            FieldType::Bytes(_)
            | FieldType::Blob(_)
            | FieldType::CidLink(_)
            | FieldType::Unknown(_) => quote! {},
            FieldType::Array(a) => {
                let mut out = TokenStream::new();
                if a.min_length.is_some() || a.max_length.is_some() {
                    let (min, max) = (opt(a.min_length), opt(a.max_length));
                    out.extend(quote! { #c::length(#value.len(), &path, #min, #max)?; });
                }
                let i = format_ident!("i{depth}");
                let item = format_ident!("item{depth}");
                let inner = self.checks(&a.items, nsid, quote!(#item), depth + 1)?;
                if !inner.is_empty() {
                    out.extend(quote! {
                        for (#i, #item) in #value.iter().enumerate() {
                            let path = #c::index(&path, #i);
                            #inner
                        }
                    });
                }
                out
            }
            FieldType::Object(_) | FieldType::Union(_) => {
                quote! { ::murmur_lexicon::Validate::validate_at(#value, &path)?; }
            }
            FieldType::Ref(r) => match self.set.resolve(&r.reference, nsid) {
                // A ref to a named primitive (e.g. a string with knownValues) checks inline.
                Some((full, UserType::Type(t))) if !matches!(t, FieldType::Object(_)) => {
                    let target_nsid = full.split('#').next().unwrap_or(nsid).to_owned();
                    self.checks(t, &target_nsid, value, depth)?
                }
                _ => quote! { ::murmur_lexicon::Validate::validate_at(#value, &path)?; },
            },
        })
    }
}

fn opt(v: Option<u64>) -> TokenStream {
    match v {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    }
}

fn format_variant(f: StringFormat) -> &'static str {
    match f {
        StringFormat::AtIdentifier => "AtIdentifier",
        StringFormat::AtUri => "AtUri",
        StringFormat::Cid => "Cid",
        StringFormat::Datetime => "Datetime",
        StringFormat::Did => "Did",
        StringFormat::Handle => "Handle",
        StringFormat::Nsid => "Nsid",
        StringFormat::Tid => "Tid",
        StringFormat::RecordKey => "RecordKey",
        StringFormat::Uri => "Uri",
        StringFormat::Language => "Language",
    }
}

/// `#[doc = ...]` attributes, one per line of `text`.
fn doc_attrs(text: &str) -> TokenStream {
    let lines = text.lines().map(|l| {
        if l.is_empty() {
            String::new()
        } else {
            format!(" {l}")
        }
    });
    quote! { #(#[doc = #lines])* }
}

const KEYWORDS: &[&str] = &[
    "as", "break", "const", "continue", "else", "enum", "extern", "false", "fn", "for", "if",
    "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "static",
    "struct", "trait", "true", "type", "unsafe", "use", "where", "while", "async", "await", "dyn",
    "abstract", "become", "box", "do", "final", "macro", "override", "priv", "typeof", "unsized",
    "virtual", "yield", "try", "gen",
];

/// An identifier for `name`, raw (`r#type`) when it is a keyword; `self`-like words get a `_`.
fn escaped(name: String) -> Ident {
    match name.as_str() {
        "self" | "Self" | "super" | "crate" | "_" => format_ident!("{name}_"),
        n if KEYWORDS.contains(&n) => Ident::new_raw(n, Span::call_site()),
        _ => Ident::new(&name, Span::call_site()),
    }
}

fn field_ident(name: &str) -> Ident {
    let mut s = snake(name);
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    escaped(s)
}

fn module_ident(name: &str) -> Ident {
    field_ident(name)
}

fn type_ident(name: &str) -> Ident {
    escaped(type_name(name))
}

/// `camelCase`/`kebab-case`/`snake_case` -> `PascalCase`.
fn type_name(name: &str) -> String {
    let mut out = String::new();
    let mut upper = true;
    for c in name.chars() {
        if c == '-' || c == '_' || c == '.' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, 'T');
    }
    out
}

/// `camelCase` -> `snake_case` (`cid-link` -> `cid_link`, `maxURLLength` -> `max_url_length`).
fn snake(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c == '-' || c == '.' {
            out.push('_');
            continue;
        }
        if c.is_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if prev.is_lowercase() || prev.is_ascii_digit() || (prev.is_uppercase() && next_lower) {
                out.push('_');
            }
        }
        out.extend(c.to_lowercase());
    }
    out
}

fn screaming(name: &str) -> String {
    snake(name).to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(snake("taskType"), "task_type");
        assert_eq!(snake("cid-link"), "cid_link");
        assert_eq!(snake("maxURLLength"), "max_url_length");
        assert_eq!(type_name("strongRef"), "StrongRef");
        assert_eq!(field_ident("type").to_string(), "r#type");
        assert_eq!(field_ident("self").to_string(), "self_");
        assert_eq!(field_ident("2fa").to_string(), "_2fa");
        assert_eq!(screaming("highPriority"), "HIGH_PRIORITY");
    }

    #[test]
    fn catalog_record_generates_parseable_documented_code() {
        let dir = format!(
            "{}/tests/fixtures/interop/lexicon/catalog",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut set = LexiconSet::new();
        let text = std::fs::read_to_string(format!("{dir}/record.json")).unwrap();
        set.insert_json(&text, None).unwrap();
        let code = generate(&set, &[]).unwrap();
        assert!(code.contains("pub struct Record;"), "{code}");
        assert!(code.contains("pub struct RecordData"), "{code}");
        assert!(code.contains("/// field of type boolean"), "{code}");
        assert!(code.contains("pub enum RecordUnionRefs"), "{code}");
        assert!(code.contains("Union<RecordUnionRefs>"), "{code}");
        assert!(
            code.contains("pub closed_union: ::core::option::Option<RecordClosedUnionRefs>"),
            "{code}"
        );
        assert!(
            code.contains("pub const DEMO_TOKEN: &str = \"example.lexicon.record#demoToken\";"),
            "{code}"
        );
        // prettyplease output is stable: generating twice gives the same text.
        assert_eq!(code, generate(&set, &[]).unwrap());
    }

    fn cycles_fixture(name: &str) -> LexiconSet {
        let dir = format!(
            "{}/tests/fixtures/cycles/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        LexiconSet::load_dir_unchecked(dir).unwrap().0
    }

    #[test]
    fn array_alias_cycle_is_a_typed_error_naming_the_defs() {
        // Used to overflow the stack: the checks for `nested: ref #b` inlined b, then c, ...
        let set = cycles_fixture("arrays");
        match generate(&set, &[]) {
            Err(LexiconError::RefCycle { cycle, why }) => {
                assert_eq!(
                    cycle,
                    [
                        "com.example.cycles.arrays#b",
                        "com.example.cycles.arrays#c",
                        "com.example.cycles.arrays#b"
                    ]
                );
                assert!(why.contains("type` alias"), "{why}");
            }
            other => panic!("expected a RefCycle error, got {other:?}"),
        }
        // The same cycle with nothing referring to it is refused too (`type B = Vec<C>;
        // type C = Vec<B>;` does not compile on its own).
        let mut bare = LexiconSet::new();
        bare.insert_json(
            r##"{"lexicon": 1, "id": "com.example.bare", "defs": {
                "b": { "type": "array", "items": { "type": "ref", "ref": "#c" } },
                "c": { "type": "array", "items": { "type": "ref", "ref": "#b" } } } }"##,
            None,
        )
        .unwrap();
        let err = generate(&bare, &[]).unwrap_err();
        assert!(
            err.to_string().contains(
                "reference cycle com.example.bare#b -> com.example.bare#c -> com.example.bare#b"
            ),
            "{err}"
        );
    }

    #[test]
    fn builder_refuses_the_cycle_through_lint() {
        let dir = format!(
            "{}/tests/fixtures/cycles/arrays",
            env!("CARGO_MANIFEST_DIR")
        );
        match Builder::new().lexicon_dir(dir).generate_string() {
            Err(LexiconError::Lint(issues)) => {
                assert_eq!(issues.len(), 1, "{issues:?}");
                assert_eq!(issues[0].rule.name(), "ref-cycle");
                assert!(issues[0].message.contains("com.example.cycles.arrays#c"));
            }
            other => panic!("expected lint issues, got {other:?}"),
        }
    }

    #[test]
    fn fields_closing_a_struct_cycle_are_boxed_and_others_are_not() {
        let code = generate(&cycles_fixture("tree"), &[]).unwrap();
        for boxed in [
            "pub parent: ::core::option::Option<::std::boxed::Box<Node>>",
            "pub link: ::core::option::Option<::std::boxed::Box<Link>>",
            "pub target: ::std::boxed::Box<Node>",
            "pub origin: ::core::option::Option<::std::boxed::Box<Node>>",
            "pub root: ::std::boxed::Box<Node>",
            "pub tree: ::core::option::Option<::std::boxed::Box<",
        ] {
            assert!(code.contains(boxed), "missing {boxed:?} in:\n{code}");
        }
        for plain in [
            "pub children: ::core::option::Option<::std::vec::Vec<Node>>",
            "pub forest: ::core::option::Option<Forest>",
            "pub type Forest = ::std::vec::Vec<Node>;",
            "pub next: ::core::option::Option<",
        ] {
            assert!(code.contains(plain), "missing {plain:?} in:\n{code}");
        }
    }

    /// The tree fixture's generated code is checked in as `tests/fixtures/cycles/tree.rs`,
    /// where `tests/cycles.rs` compiles it and round-trips records through it. This keeps
    /// that file what the generator produces today (`MURMUR_BLESS=1` rewrites it).
    #[test]
    fn checked_in_tree_code_is_what_codegen_generates() {
        let code = generate(&cycles_fixture("tree"), &[]).unwrap();
        let path = format!(
            "{}/tests/fixtures/cycles/tree.rs",
            env!("CARGO_MANIFEST_DIR")
        );
        if std::env::var_os("MURMUR_BLESS").is_some() {
            std::fs::write(&path, &code).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == code,
            "{path} is out of date; rerun with MURMUR_BLESS=1 and review the diff"
        );
    }
}
