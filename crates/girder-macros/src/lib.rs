//! `#[girder::function]`: turns a Rust `fn` into a function callable through the grid.
//!
//! ```text
//! #[girder::function(name = "examples/fib", version = 1)]
//! pub async fn fib(ctx: Ctx, n: u64) -> Result<u64, String> { ... }
//! ```
//!
//! expands to a unit struct `fib` implementing `girder::Function`, with `fib::call(&caller,
//! n)` (async) and `fib::call_blocking(&caller, n)`. The first parameter is the context; the
//! others are the arguments, encoded together as one MessagePack array. A body returning
//! `Result<T, E>` (with `E: Display`), or an alias like `anyhow::Result<T>` or
//! `std::io::Result<T>`, has its errors reported as function errors; any other return type
//! is a plain value.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Expr, ExprLit, FnArg, GenericArgument, ItemFn, Lit, Meta, Pat, PathArguments, ReturnType, Token, Type};

/// Registers a function under a name (required), a version (default 0) and optionally its
/// policies (`retries = N`, `timeout_ms = N`, `ttl_ms = N`; default the node's). See the crate docs.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(attr: Tokens, item: Tokens) -> syn::Result<Tokens> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let mut name = None;
    let mut version = quote!(0u32);
    let mut retries = quote!(::core::option::Option::None);
    let mut timeout = quote!(::core::option::Option::None);
    let mut ttl = quote!(::core::option::Option::None);
    for meta in metas {
        let Meta::NameValue(pair) = meta else {
            return Err(syn::Error::new_spanned(meta, "expected `name = \"ns/fn\"` or `version = N`"));
        };
        let key = pair.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
        match (key.as_str(), &pair.value) {
            ("name", Expr::Lit(ExprLit { lit: Lit::Str(text), .. })) => {
                if text.value().is_empty() || text.value().contains(char::is_whitespace) {
                    return Err(syn::Error::new_spanned(text, "the name must be non-empty and without spaces"));
                }
                name = Some(text.clone());
            }
            ("version", Expr::Lit(ExprLit { lit: Lit::Int(number), .. })) => {
                let value: u32 = number.base10_parse()?;
                version = quote!(#value);
            }
            ("retries", Expr::Lit(ExprLit { lit: Lit::Int(number), .. })) => {
                let value: u32 = number.base10_parse()?;
                retries = quote!(::core::option::Option::Some(#value));
            }
            ("timeout_ms", Expr::Lit(ExprLit { lit: Lit::Int(number), .. })) => {
                let value: u64 = number.base10_parse()?;
                if value == 0 {
                    return Err(syn::Error::new_spanned(number, "a timeout must be at least 1 ms"));
                }
                timeout = quote!(::core::option::Option::Some(#value));
            }
            ("ttl_ms", Expr::Lit(ExprLit { lit: Lit::Int(number), .. })) => {
                let value: u64 = number.base10_parse()?;
                if value == 0 {
                    return Err(syn::Error::new_spanned(number, "a memo TTL must be at least 1 ms"));
                }
                ttl = quote!(::core::option::Option::Some(#value));
            }
            _ => {
                return Err(syn::Error::new_spanned(
                    pair,
                    "expected `name = \"ns/fn\"`, `version = N`, `retries = N`, `timeout_ms = N` or `ttl_ms = N`",
                ))
            }
        }
    }
    let func: ItemFn = syn::parse2(item)?;
    let Some(name) = name else {
        return Err(syn::Error::new_spanned(&func.sig.ident, "#[girder::function] needs `name = \"ns/fn\"`"));
    };
    if !func.sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(&func.sig.generics, "grid functions cannot be generic"));
    }
    let is_async = func.sig.asyncness.is_some();
    let mut inputs = func.sig.inputs.iter();
    let Some(FnArg::Typed(ctx_arg)) = inputs.next() else {
        return Err(syn::Error::new_spanned(&func.sig, "the first parameter must be the context, e.g. `ctx: Ctx`"));
    };
    let ctx_ty = &ctx_arg.ty;
    let mut arg_names = Vec::new();
    let mut arg_types = Vec::new();
    for (index, input) in inputs.enumerate() {
        let FnArg::Typed(typed) = input else {
            return Err(syn::Error::new_spanned(input, "grid functions take no `self`"));
        };
        let ident = match &*typed.pat {
            Pat::Ident(pat) => pat.ident.clone(),
            _ => format_ident!("arg{}", index),
        };
        arg_names.push(ident);
        arg_types.push((*typed.ty).clone());
    }
    let (output, fallible) = match &func.sig.output {
        ReturnType::Default => (syn::parse_quote!(()), false),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some(ok) => (ok, true),
            None => ((**ty).clone(), false),
        },
    };
    let param_names: Vec<String> = arg_names.iter().map(|name| name.to_string()).collect();
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let docs = func.attrs.iter().filter(|a| a.path().is_ident("doc"));
    let inner_ident = format_ident!("__girder_body_{}", ident);
    let mut inner = func.clone();
    inner.sig.ident = inner_ident.clone();
    inner.vis = syn::Visibility::Inherited;
    inner.attrs.retain(|a| !a.path().is_ident("doc"));
    let args_ty: Type =
        if arg_types.is_empty() { syn::parse_quote!([u8; 0]) } else { syn::parse_quote!((#(#arg_types,)*)) };
    let args_pat = if arg_names.is_empty() { quote!(_) } else { quote!((#(#arg_names,)*)) };
    let args_expr = if arg_names.is_empty() { quote!([]) } else { quote!((#(#arg_names,)*)) };
    let to_result =
        if fallible { quote!(.map_err(::girder::error_text)) } else { quote!(; ::core::result::Result::Ok(__value)) };
    let bind = if fallible { quote!() } else { quote!(let __value = ) };
    let (kind, run_async, run_blocking) = if is_async {
        (
            quote!(::girder::FnKind::Async),
            quote! {
                #inner
                ::std::boxed::Box::pin(async move {
                    let #args_pat = args;
                    #bind #inner_ident(ctx, #(#arg_names),*).await #to_result
                })
            },
            quote! {
                let _ = (ctx, args);
                ::core::result::Result::Err(::std::format!("{} is async and cannot run on a blocking slot", #name))
            },
        )
    } else {
        (
            quote!(::girder::FnKind::Blocking),
            quote! {
                let _ = (ctx, args);
                ::std::boxed::Box::pin(async move {
                    ::core::result::Result::Err(::std::format!("{} is blocking and cannot run as a task", #name))
                })
            },
            quote! {
                #inner
                let #args_pat = args;
                #bind #inner_ident(ctx, #(#arg_names),*) #to_result
            },
        )
    };
    let call_doc = format!("Calls `{}` through the grid and waits for its result.", name.value());
    let blocking_doc =
        format!("Calls `{}` through the grid, blocking this thread until its result is there.", name.value());
    Ok(quote! {
        #(#docs)*
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #ident;

        impl #ident {
            #[doc = #call_doc]
            #vis fn call<'__c, __C: ::girder::Caller + ?Sized>(
                caller: &'__c __C,
                #(#arg_names: #arg_types),*
            ) -> impl ::core::future::Future<Output = ::core::result::Result<#output, ::girder::CallError>> + Send + '__c {
                ::girder::call::<#ident, __C>(caller, #args_expr)
            }

            #[doc = #blocking_doc]
            #vis fn call_blocking<__C: ::girder::Caller + ?Sized>(
                caller: &__C,
                #(#arg_names: #arg_types),*
            ) -> ::core::result::Result<#output, ::girder::CallError> {
                ::girder::call_blocking::<#ident, __C>(caller, #args_expr)
            }
        }

        impl ::girder::Function for #ident {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const KIND: ::girder::FnKind = #kind;
            const POLICY: ::girder::Policy = ::girder::Policy { retries: #retries, timeout_ms: #timeout, ttl_ms: #ttl };
            const PARAMS: &'static [&'static str] = &[#(#param_names),*];
            type Args = #args_ty;
            type Output = #output;

            #[allow(unused_variables)]
            fn run_async(ctx: #ctx_ty, args: Self::Args)
                -> ::girder::BoxFuture<'static, ::core::result::Result<Self::Output, ::std::string::String>> {
                #run_async
            }

            #[allow(unused_variables)]
            fn run_blocking(ctx: #ctx_ty, args: Self::Args) -> ::core::result::Result<Self::Output, ::std::string::String> {
                #run_blocking
            }

            fn explain_args(args: &[u8]) -> ::core::option::Option<::std::string::String> {
                let checks: &[::girder::codec::ArgCheck] = &[#(::girder::codec::check_one::<#arg_types>),*];
                ::girder::codec::explain_args(args, Self::PARAMS, checks)
            }
        }
    })
}

/// `T` when `ty` is written `Result<T, E>` or `Result<T>` (any path ending in `Result`, so
/// `anyhow::Result<T>` and `std::io::Result<T>` too; the error must be `Display`).
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    match args.args.first()? {
        GenericArgument::Type(ok) if args.args.len() <= 2 => Some(ok.clone()),
        _ => None,
    }
}
