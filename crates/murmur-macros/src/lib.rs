//! The `#[handler]` attribute for murmur watcher handlers.
//!
//! Any `async fn` whose arguments are extractors is already a handler (murmur implements
//! `Handler` for every such fn, as axum does); `#[handler]` adds two things:
//!
//! - compile errors that say what is wrong: one error per argument that is not an extractor,
//!   pointing at it and naming it, and an error when the arguments do not give exactly one
//!   route (`Record<C>`, `Created<C>`, `Updated<C>`, `Deleted<C>`, `Identity` or `AccountStatus`);
//! - a readable name, the fn's, in logs and dead letters.
//!
//! The fn becomes a unit struct of the same name implementing `Handler` (pass it as
//! `.handler(on_task)`); the original fn stays callable as `on_task::call(..)`.
//!
//! The expansion names its runtime through the crate the user depends on: `murmur` (also
//! when renamed in Cargo.toml) or else `murmur-firehose`, found with `proc-macro-crate`.
//! `#[handler(crate = path)]` names it explicitly, e.g. for a crate that re-exports murmur.
//! See the `murmur` crate docs for an example.

use proc_macro::TokenStream;
use proc_macro_crate::{FoundCrate, crate_name};
use proc_macro2::Span;
use quote::{format_ident, quote, quote_spanned};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Meta, Token, parse_macro_input};

/// Checks an async fn's arguments at compile time and names the handler after the fn.
/// See the crate docs.
#[proc_macro_attribute]
pub fn handler(attr: TokenStream, item: TokenStream) -> TokenStream {
    let metas = parse_macro_input!(attr with Punctuated::<Meta, Token![,]>::parse_terminated);
    let func = parse_macro_input!(item as ItemFn);
    expand(metas, func)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// The path of the crate holding `__private`: murmur if the user depends on it, else
/// murmur-firehose, under whatever name Cargo.toml gives them.
fn runtime_crate() -> syn::Path {
    for (package, own) in [("murmur", "murmur"), ("murmur-firehose", "murmur_firehose")] {
        match crate_name(package) {
            // Inside the crate itself (its tests, examples and doctests see it by name; its
            // lib declares `extern crate self as ..`).
            Ok(FoundCrate::Itself) => {
                let ident = syn::Ident::new(own, Span::call_site());
                return syn::parse_quote!(::#ident);
            }
            Ok(FoundCrate::Name(name)) => {
                let ident = syn::Ident::new(&name, Span::call_site());
                return syn::parse_quote!(::#ident);
            }
            Err(_) => {}
        }
    }
    syn::parse_quote!(::murmur)
}

fn expand(
    metas: Punctuated<Meta, Token![,]>,
    func: ItemFn,
) -> syn::Result<proc_macro2::TokenStream> {
    let mut krate: Option<syn::Path> = None;
    for meta in metas {
        match &meta {
            Meta::NameValue(nv) if nv.path.is_ident("crate") => match &nv.value {
                syn::Expr::Path(p) => krate = Some(p.path.clone()),
                other => {
                    return Err(syn::Error::new(
                        other.span(),
                        "expected a path, e.g. `crate = ::murmur`",
                    ));
                }
            },
            Meta::Path(p) if p.is_ident("create") || p.is_ident("update") => {
                return Err(syn::Error::new(
                    p.span(),
                    "the route comes from the argument type: take `Created<C>` or `Updated<C>` instead of `Record<C>`",
                ));
            }
            other => {
                return Err(syn::Error::new(
                    other.span(),
                    "unknown option: expected `crate = path`",
                ));
            }
        }
    }
    let krate = krate.unwrap_or_else(runtime_crate);
    let private = quote!(#krate::__private);

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
    if func.sig.inputs.is_empty() {
        return Err(syn::Error::new(
            func.sig.paren_token.span.join(),
            "a murmur handler needs one `Record<C>`, `Created<C>`, `Updated<C>`, `Deleted<C>`, `Identity` or `AccountStatus` argument: its type fixes the events it gets",
        ));
    }

    let name = &func.sig.ident;
    let vis = &func.vis;
    let attrs = &func.attrs;
    let mut checks = Vec::new();
    let mut arg_fns = Vec::new();
    let mut bindings = Vec::new();
    for (i, arg) in func.sig.inputs.iter().enumerate() {
        let FnArg::Typed(pat_type) = arg else {
            return Err(syn::Error::new(
                arg.span(),
                "#[handler] functions cannot take `self`",
            ));
        };
        let ty = &*pat_type.ty;
        let arg_name = match &*pat_type.pat {
            syn::Pat::Ident(id) => id.ident.to_string(),
            _ => format!("{}", i + 1),
        };
        let check = format_ident!(
            "argument_{}_must_be_an_extractor",
            arg_name.trim_start_matches('_')
        );
        // Every use of the argument's type goes through this one call, so a type that is not
        // an extractor is one error, at the argument, naming it.
        checks.push(quote_spanned! {ty.span()=>
            #[allow(non_snake_case)]
            const fn #check<T: #private::FromOp>() -> #private::ArgFns<T> {
                #private::arg_fns::<T>()
            }
        });
        arg_fns.push(quote_spanned! {ty.span()=> #check::<#ty>() });
        bindings.push(format_ident!("__murmur_arg{}", i));
    }

    let inputs = &func.sig.inputs;
    let output = &func.sig.output;
    let block = &func.block;
    let name_str = name.to_string();
    let route_msg = format!(
        "handler `{name_str}` needs exactly one `Record<C>`, `Created<C>`, `Updated<C>`, `Deleted<C>`, `Identity` or `AccountStatus` argument: its type fixes the events it gets"
    );
    let routes_span = func.sig.inputs.span();
    let route_check = quote_spanned! {routes_span=>
        const _: () = ::core::assert!(
            #private::count_routes(&[#(#arg_fns.route),*]) == 1,
            #route_msg
        );
    };
    Ok(quote! {
        #(#attrs)*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #name;

        impl #name {
            #(#attrs)*
            #vis async fn call(#inputs) #output #block
        }

        const _: () = {
            #(#checks)*
            #route_check

            impl #private::Handler for #name {
                fn name(&self) -> &'static str {
                    #name_str
                }

                fn route(&self) -> #private::Route {
                    #private::the_route(&[#(#arg_fns.route),*])
                }

                fn required_state(&self) -> ::std::vec::Vec<(::std::any::TypeId, &'static str)> {
                    [#((#arg_fns.required_state)()),*].into_iter().flatten().collect()
                }

                fn call(&self, op: #private::OpEvent) -> #private::BoxFuture<::core::result::Result<(), #private::CallError>> {
                    #(
                        let #bindings = match (#arg_fns.from_op)(&op) {
                            ::core::result::Result::Ok(value) => value,
                            ::core::result::Result::Err(rejection) => {
                                return ::std::boxed::Box::pin(::core::future::ready(
                                    ::core::result::Result::Err(#private::CallError::Rejected(rejection)),
                                ));
                            }
                        };
                    )*
                    ::std::boxed::Box::pin(async move {
                        let result: ::core::result::Result<(), #private::HandlerError> =
                            #name::call(#(#bindings),*).await;
                        result.map_err(#private::CallError::Handler)
                    })
                }
            }
        };
    })
}
