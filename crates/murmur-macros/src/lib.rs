//! The `#[handler]` attribute: turns an async fn into a typed murmur watcher handler.
//!
//! ```ignore
//! #[handler]
//! async fn on_task(task: Record<Task>, from: Author, State(db): State<Db>) -> Result<(), HandlerError> {
//!     Ok(())
//! }
//! // then: Watcher::builder().handler(on_task)
//! ```
//!
//! The collection comes from the one `Record<T>` (creates and updates; `#[handler(create)]`
//! or `#[handler(update)]` narrows it) or `Deleted<T>` argument. Every other argument must be
//! an extractor (`murmur_firehose::FromOp`); a wrong argument type is a compile error that
//! names the argument. The fn stays callable as `on_task::call(..)`.

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote, quote_spanned};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, Meta, PathArguments, Token, Type, parse_macro_input};

/// Makes an async fn a murmur handler. See the crate docs.
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let metas = parse_macro_input!(attr with Punctuated::<Meta, Token![,]>::parse_terminated);
    let func = parse_macro_input!(item as ItemFn);
    expand(metas, func)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

enum RouteArg {
    Record(Type),
    Deleted(Type),
}

fn expand(
    metas: Punctuated<Meta, Token![,]>,
    func: ItemFn,
) -> syn::Result<proc_macro2::TokenStream> {
    let mut krate: syn::Path = syn::parse_quote!(::murmur_firehose);
    let (mut create, mut update) = (false, false);
    for meta in metas {
        match &meta {
            Meta::Path(p) if p.is_ident("create") => create = true,
            Meta::Path(p) if p.is_ident("update") => update = true,
            Meta::NameValue(nv) if nv.path.is_ident("crate") => match &nv.value {
                syn::Expr::Path(p) => krate = p.path.clone(),
                other => {
                    return Err(syn::Error::new(
                        other.span(),
                        "expected a path, e.g. `crate = murmur::firehose`",
                    ));
                }
            },
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "unknown option: expected `create`, `update` or `crate = path`",
                ));
            }
        }
    }

    if func.sig.asyncness.is_none() {
        return Err(syn::Error::new(
            func.sig.fn_token.span(),
            "#[handler] needs an `async fn`",
        ));
    }
    if !func.sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            func.sig.generics.span(),
            "#[handler] functions cannot be generic",
        ));
    }

    let name = &func.sig.ident;
    let vis = &func.vis;
    let attrs = &func.attrs;
    let mut route: Option<RouteArg> = None;
    let mut bindings = Vec::new();
    let mut extracts = Vec::new();
    let mut checks = Vec::new();
    let mut states = Vec::new();
    for (i, arg) in func.sig.inputs.iter().enumerate() {
        let FnArg::Typed(pat_type) = arg else {
            return Err(syn::Error::new(
                arg.span(),
                "#[handler] functions cannot take `self`",
            ));
        };
        let ty = &*pat_type.ty;
        if let Some(found) = route_arg(ty) {
            if route.is_some() {
                return Err(syn::Error::new(
                    ty.span(),
                    "a handler takes exactly one `Record<T>` or `Deleted<T>` argument",
                ));
            }
            route = Some(found);
        }
        let arg_name = match &*pat_type.pat {
            syn::Pat::Ident(id) => id.ident.to_string(),
            _ => format!("{}", i + 1),
        };
        let binding = format_ident!("__murmur_arg{}", i);
        let check = format_ident!(
            "argument_{}_must_be_an_extractor",
            arg_name.trim_start_matches('_')
        );
        checks.push(quote_spanned! {ty.span()=>
            #[allow(non_snake_case, dead_code)]
            fn #check<T: #krate::FromOp>() {}
            #check::<#ty>();
        });
        extracts.push(quote_spanned! {ty.span()=>
            let #binding = match <#ty as #krate::FromOp>::from_op(&op) {
                ::core::result::Result::Ok(value) => value,
                ::core::result::Result::Err(rejection) => {
                    return ::std::boxed::Box::pin(async move {
                        ::core::result::Result::Err(#krate::CallError::Rejected(rejection))
                    });
                }
            };
        });
        states.push(quote! {
            if let ::core::option::Option::Some(s) = <#ty as #krate::FromOp>::required_state() {
                required.push(s);
            }
        });
        bindings.push(binding);
    }

    let (collection_ty, actions) = match route {
        Some(RouteArg::Record(t)) => {
            let actions = match (create, update) {
                (true, false) => quote!(&[#krate::Action::Create]),
                (false, true) => quote!(&[#krate::Action::Update]),
                _ => quote!(&[#krate::Action::Create, #krate::Action::Update]),
            };
            (t, actions)
        }
        Some(RouteArg::Deleted(t)) => {
            if create || update {
                return Err(syn::Error::new(
                    Span::call_site(),
                    "`create`/`update` do not apply to a `Deleted<T>` handler",
                ));
            }
            (t, quote!(&[#krate::Action::Delete]))
        }
        None => {
            return Err(syn::Error::new(
                func.sig.inputs.span(),
                "a murmur handler needs one `Record<T>` or `Deleted<T>` argument: its type fixes the collection",
            ));
        }
    };

    let inputs = &func.sig.inputs;
    let output = &func.sig.output;
    let block = &func.block;
    let name_str = name.to_string();
    Ok(quote! {
        #(#attrs)*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #name;

        impl #name {
            #(#attrs)*
            #vis async fn call(#inputs) #output #block
        }

        impl #krate::Handler for #name {
            fn name(&self) -> &'static str {
                #name_str
            }

            fn route(&self) -> #krate::Route {
                #krate::Route {
                    collection: <#collection_ty as #krate::__private::Collection>::NSID,
                    actions: #actions,
                }
            }

            fn required_state(&self) -> ::std::vec::Vec<(::std::any::TypeId, &'static str)> {
                let mut required = ::std::vec::Vec::new();
                #(#states)*
                required
            }

            fn call(&self, op: #krate::OpEvent) -> #krate::BoxFuture<::core::result::Result<(), #krate::CallError>> {
                #[allow(unused)]
                fn __murmur_checks() {
                    #(#checks)*
                }
                #(#extracts)*
                ::std::boxed::Box::pin(async move {
                    let result: ::core::result::Result<(), #krate::HandlerError> = #name::call(#(#bindings),*).await;
                    result.map_err(#krate::CallError::Handler)
                })
            }
        }
    })
}

/// `Record<T>` or `Deleted<T>` (by last path segment), with `T`.
fn route_arg(ty: &Type) -> Option<RouteArg> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let Some(GenericArgument::Type(inner)) = args.args.first() else {
        return None;
    };
    match last.ident.to_string().as_str() {
        "Record" => Some(RouteArg::Record(inner.clone())),
        "Deleted" => Some(RouteArg::Deleted(inner.clone())),
        _ => None,
    }
}
