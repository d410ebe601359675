//! `#[girder::function]`: turns a Rust `fn` into a function callable through the grid.
//!
//! ```text
//! #[girder::function(name = "examples/greet", version = 1, retries = 2, timeout_ms = 5_000)]
//! pub async fn greet(ctx: Ctx, name: &str, counts: &[u32]) -> anyhow::Result<String> { ... }
//! ```
//!
//! expands to a unit struct `greet` implementing `girder::Function`, with:
//!
//! - `greet::call(&caller, name, counts)` (async) and `greet::call_blocking(&caller, name,
//!   counts)`, taking the parameters as written (borrowed ones borrowed);
//! - `greet::run(ctx, name, counts)`: the body itself, with the signature as written, to call
//!   directly in a unit test with a context from `girder::Ctx::for_tests(&node)` (whose
//!   nested calls are top-level calls through that node);
//! - `greet::schemas()` (from `Function`): each parameter's and the result's JSON schema,
//!   from `schemars` when the type implements `girder::schemars::JsonSchema`, `true` (any
//!   value) when it does not.
//!
//! The first parameter is the context (`ctx: Ctx`, `_ctx: Ctx` when unused); the others are
//! the arguments, encoded together as one MessagePack array. A parameter written `&T`
//! (`&str`, `&[u32]`, `&Config`, with or without a lifetime) travels owned (`String`,
//! `Vec<u32>`, `Config`; `PathBuf` for `&Path`) and `call` encodes the borrowed value to the
//! same bytes as the owned one, so both are one request; the body gets a reference to it. A body
//! returning `Result<T, E>` (with `E: Display`), or an alias like `anyhow::Result<T>` or
//! `std::io::Result<T>`, has its errors reported as function errors; any other return type
//! is a plain value. Signatures that cannot work on a grid (generic, `self`, `&mut`,
//! `impl Trait`, patterns, no context) are refused with a message saying what to write.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens, TokenTree};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{
    Expr, ExprLit, FnArg, GenericArgument, GenericParam, Ident, ItemFn, Lit, LitStr, Meta, Pat, PatType, PathArguments,
    ReturnType, Signature, Token, Type,
};

/// Registers a function under a name (required), a version (default 0) and optionally its
/// policies (`retries = N`, `timeout_ms = N`, `ttl_ms = N`; default the node's). The body
/// stays callable as `NAME::run(ctx, ...)` (with `girder::Ctx::for_tests(&node)` in tests).
/// See the crate docs.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

/// What the attribute's arguments say.
struct Attrs {
    name: LitStr,
    version: Tokens,
    retries: Tokens,
    timeout_ms: Tokens,
    ttl_ms: Tokens,
}

const ATTR_KEYS: &str = "expected `name = \"ns/fn\"`, `version = N`, `retries = N`, `timeout_ms = N` or `ttl_ms = N`";

fn parse_attrs(attr: Tokens, func: &ItemFn) -> syn::Result<Attrs> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    let none = quote!(::core::option::Option::None);
    let (mut name, mut version) = (None, quote!(0u32));
    let (mut retries, mut timeout_ms, mut ttl_ms) = (none.clone(), none.clone(), none);
    for meta in metas {
        let Meta::NameValue(pair) = meta else {
            return Err(syn::Error::new_spanned(meta, ATTR_KEYS));
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
                let value = positive_ms(
                    number,
                    "a timeout must be at least 1 ms: write `timeout_ms = 1` or more, or leave it out for the node's",
                )?;
                timeout_ms = quote!(::core::option::Option::Some(#value));
            }
            ("ttl_ms", Expr::Lit(ExprLit { lit: Lit::Int(number), .. })) => {
                let value = positive_ms(
                    number,
                    "a memo TTL must be at least 1 ms: write `ttl_ms = 1` or more, or leave it out to \
                     keep results until evicted",
                )?;
                ttl_ms = quote!(::core::option::Option::Some(#value));
            }
            _ => return Err(syn::Error::new_spanned(pair, ATTR_KEYS)),
        }
    }
    let Some(name) = name else {
        return Err(syn::Error::new_spanned(&func.sig.ident, "#[girder::function] needs `name = \"ns/fn\"`"));
    };
    Ok(Attrs { name, version, retries, timeout_ms, ttl_ms })
}

fn positive_ms(number: &syn::LitInt, message: &str) -> syn::Result<u64> {
    let value: u64 = number.base10_parse()?;
    if value == 0 {
        return Err(syn::Error::new_spanned(number, message));
    }
    Ok(value)
}

/// One argument of the grid function (the context excluded).
struct Param {
    name: Ident,
    /// The type as the body takes it, lifetimes elided: what `call` takes too.
    written: Type,
    /// The type on the wire: `T` itself, or its owned form for `&T` (see [`owned_of`]).
    owned: Type,
    /// `T` when the body takes it as `&T`: it gets a reference to the owned value.
    borrowed: Option<Type>,
}

/// Combines errors so that a signature with several problems reports all of them at once.
fn push_error(errors: &mut Option<syn::Error>, error: syn::Error) {
    match errors {
        Some(first) => first.combine(error),
        None => *errors = Some(error),
    }
}

/// The refusals that concern the signature as a whole: generics, `unsafe`, `extern`.
fn check_signature(sig: &Signature, errors: &mut Option<syn::Error>) {
    for param in &sig.generics.params {
        if !matches!(param, GenericParam::Lifetime(_)) {
            push_error(
                errors,
                syn::Error::new_spanned(
                    param,
                    "grid functions cannot be generic: arguments are decoded from the request into \
                     one concrete type each; write the concrete type, or one function per type \
                     (e.g. `sum_u64` and `sum_f64`)",
                ),
            );
        }
    }
    if let Some(clause) = &sig.generics.where_clause {
        push_error(
            errors,
            syn::Error::new_spanned(clause, "grid functions take no `where` clause: write concrete types"),
        );
    }
    if let Some(token) = &sig.unsafety {
        push_error(
            errors,
            syn::Error::new_spanned(token, "grid functions cannot be `unsafe`: call unsafe code from the body"),
        );
    }
    if let Some(abi) = &sig.abi {
        push_error(errors, syn::Error::new_spanned(abi, "grid functions are Rust functions: remove the `extern`"));
    }
}

/// The context parameter: the first one, whose type is `Ctx` (or a path ending in `Ctx`).
fn context_param(sig: &Signature) -> syn::Result<&PatType> {
    const WRITE: &str = "the first parameter must be the context: write `ctx: Ctx` (`_ctx: Ctx` when \
                         unused, with `use girder::Ctx;`) before the arguments";
    match sig.inputs.first() {
        Some(FnArg::Typed(typed)) if is_ctx(&typed.ty) => Ok(typed),
        Some(FnArg::Typed(typed)) => Err(syn::Error::new_spanned(typed, WRITE)),
        Some(FnArg::Receiver(receiver)) => Err(self_error(receiver)),
        None => Err(syn::Error::new(sig.paren_token.span.join(), WRITE)),
    }
}

fn is_ctx(ty: &Type) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => {
            path.path.segments.last().is_some_and(|last| last.ident == "Ctx" && last.arguments.is_none())
        }
        Type::Group(group) => is_ctx(&group.elem),
        Type::Paren(paren) => is_ctx(&paren.elem),
        _ => false,
    }
}

fn self_error(receiver: &syn::Receiver) -> syn::Error {
    syn::Error::new_spanned(
        receiver,
        "grid functions are free functions (outside any `impl`) and take no `self`: pass the \
         value as an argument after the context instead, e.g. `fn area(ctx: Ctx, shape: Shape)`",
    )
}

/// Whether `tokens` hold a `&`, `impl` or a lifetime other than `'static`.
fn borrows(tokens: Tokens) -> bool {
    let mut tokens = tokens.into_iter().peekable();
    while let Some(token) = tokens.next() {
        let found = match &token {
            TokenTree::Punct(p) if p.as_char() == '&' => true,
            TokenTree::Punct(p) if p.as_char() == '\'' => {
                !matches!(tokens.peek(), Some(TokenTree::Ident(ident)) if ident == "static")
            }
            TokenTree::Ident(ident) => ident == "impl",
            TokenTree::Group(group) => borrows(group.stream()),
            TokenTree::Literal(_) | TokenTree::Punct(_) => false,
        };
        if found {
            return true;
        }
    }
    false
}

/// One argument, or why it cannot be one.
fn param(input: &FnArg) -> syn::Result<Param> {
    let typed = match input {
        FnArg::Typed(typed) => typed,
        FnArg::Receiver(receiver) => return Err(self_error(receiver)),
    };
    let name = match &*typed.pat {
        Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => pat.ident.clone(),
        Pat::Wild(pat) => {
            return Err(syn::Error::new_spanned(
                pat,
                "name this parameter (`_name` when unused): parameter names are what callers and the \
                 catalogue see",
            ))
        }
        pat => {
            return Err(syn::Error::new_spanned(
                pat,
                "name this parameter, e.g. `point: (u32, u32)`, and destructure it in the body: \
                 parameter names are what callers and the catalogue see",
            ))
        }
    };
    let ty = &*typed.ty;
    match ty {
        Type::Reference(reference) if reference.mutability.is_some() => Err(syn::Error::new_spanned(
            ty,
            "a grid function cannot change its caller's value: take it by value or as `&T`, and \
             return the changed value",
        )),
        Type::Reference(reference) if reference.lifetime.as_ref().is_some_and(|l| l.ident == "static") => {
            Err(syn::Error::new_spanned(
                ty,
                "an argument lives only as long as its evaluation: drop the `'static` (e.g. `&str`), \
                 or take the owned type (e.g. `String`)",
            ))
        }
        Type::Reference(reference) => {
            let elem = &*reference.elem;
            if borrows(quote!(#elem)) {
                return Err(nested_borrow_error(ty));
            }
            let owned = owned_of(elem);
            Ok(Param { name, written: syn::parse_quote!(&#elem), owned, borrowed: Some(elem.clone()) })
        }
        Type::ImplTrait(_) => Err(syn::Error::new_spanned(
            ty,
            "arguments are decoded from the request into one concrete type: write the type, e.g. \
             `String` or `Vec<u64>`, instead of `impl ...`",
        )),
        _ if borrows(quote!(#ty)) => Err(nested_borrow_error(ty)),
        _ => Ok(Param { name, written: ty.clone(), owned: ty.clone(), borrowed: None }),
    }
}

/// What `&elem` travels as: `String` for `str`, `Vec<T>` for `[T]`, the `ToOwned` form of
/// the other unsized types of `std` (`Path`, `OsStr`, `CStr`), and `elem` itself otherwise
/// (so a borrowed struct needs no `Clone`).
fn owned_of(elem: &Type) -> Type {
    match elem {
        Type::Slice(slice) => {
            let item = &slice.elem;
            syn::parse_quote!(::std::vec::Vec<#item>)
        }
        Type::Path(path) if path.qself.is_none() => {
            let last = path.path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default();
            match last.as_str() {
                "str" => syn::parse_quote!(::std::string::String),
                "Path" | "OsStr" | "CStr" => syn::parse_quote!(<#elem as ::std::borrow::ToOwned>::Owned),
                _ => elem.clone(),
            }
        }
        _ => elem.clone(),
    }
}

fn nested_borrow_error(ty: &Type) -> syn::Error {
    syn::Error::new_spanned(
        ty,
        "only a whole parameter can be borrowed (`&str`, `&[T]`, `&T`): write owned types inside, \
         e.g. `Vec<String>` or `&[String]` for `Vec<&str>`, `Option<String>` for `Option<&str>`",
    )
}

/// The result type on the wire, and when the body returns a `Result` whose errors are
/// function errors, where its error type is written (for errors about it).
fn output(sig: &Signature) -> syn::Result<(Type, Option<Span>)> {
    let (ty, fallible) = match &sig.output {
        ReturnType::Default => return Ok((syn::parse_quote!(()), None)),
        ReturnType::Type(_, ty) => match result_ok_type(ty) {
            Some((ok, error)) => (ok, Some(error)),
            None => ((**ty).clone(), None),
        },
    };
    if borrows(quote!(#ty)) {
        return Err(syn::Error::new_spanned(
            &ty,
            "a grid function returns an owned, concrete value that is memoized and sent to its \
             callers: e.g. `String` for `&str`, `Vec<T>` for `&[T]`, the type itself for `impl ...`",
        ));
    }
    Ok((ty, fallible))
}

fn expand(attr: Tokens, item: Tokens) -> syn::Result<Tokens> {
    let func: ItemFn = syn::parse2(item)?;
    let attrs = parse_attrs(attr, &func)?;
    let mut errors = None;
    check_signature(&func.sig, &mut errors);
    let ctx = context_param(&func.sig).map_err(|error| push_error(&mut errors, error));
    let mut params = Vec::new();
    for input in func.sig.inputs.iter().skip(1) {
        match param(input) {
            Ok(param) => params.push(param),
            Err(error) => push_error(&mut errors, error),
        }
    }
    let output = output(&func.sig).map_err(|error| push_error(&mut errors, error));
    match (ctx, output, errors) {
        (Ok(ctx), Ok((output, fallible)), None) => Ok(generate(&func, &attrs, &ctx.ty, &params, &output, fallible)),
        // Every refusal above was pushed to `errors`.
        (.., errors) => Err(errors.unwrap_or_else(|| syn::Error::new(func.sig.span(), "unsupported signature"))),
    }
}

/// The expansion of a checked signature.
fn generate(
    func: &ItemFn,
    attrs: &Attrs,
    ctx_ty: &Type,
    params: &[Param],
    output: &Type,
    fallible: Option<Span>,
) -> Tokens {
    let Attrs { name, version, retries, timeout_ms, ttl_ms } = attrs;
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let docs: Vec<_> = func.attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    let names: Vec<&Ident> = params.iter().map(|p| &p.name).collect();
    let owned: Vec<&Type> = params.iter().map(|p| &p.owned).collect();
    let param_names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let args_ty: Type = if params.is_empty() { syn::parse_quote!([u8; 0]) } else { syn::parse_quote!((#(#owned,)*)) };
    let helpers = call_helpers(vis, ident, name, params, output);
    let run = run_fn(func);
    let (kind, run_async, run_blocking) = bodies(func.sig.asyncness.is_some(), name, params, fallible);
    let schemas = schemas_fn(&owned, output);
    let separator = if docs.is_empty() { None } else { Some(quote!(#[doc = ""])) };
    let summary = format!(
        "Grid function `{}`: call it with [`{ident}::call`] or [`{ident}::call_blocking`], run its \
         body directly with [`{ident}::run`].",
        name.value()
    );
    quote! {
        #(#docs)*
        #separator
        #[doc = #summary]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #ident;

        impl #ident {
            #run
            #helpers
        }

        impl ::girder::Function for #ident {
            const NAME: &'static str = #name;
            const VERSION: u32 = #version;
            const KIND: ::girder::FnKind = #kind;
            const POLICY: ::girder::Policy =
                ::girder::Policy { retries: #retries, timeout_ms: #timeout_ms, ttl_ms: #ttl_ms };
            const PARAMS: &'static [&'static str] = &[#(#param_names),*];
            type Args = #args_ty;
            type Output = #output;

            #[allow(unused_variables)]
            fn run_async(__girder_ctx: #ctx_ty, __girder_args: Self::Args)
                -> ::girder::BoxFuture<'static, ::core::result::Result<Self::Output, ::std::string::String>> {
                #run_async
            }

            #[allow(unused_variables)]
            fn run_blocking(__girder_ctx: #ctx_ty, __girder_args: Self::Args)
                -> ::core::result::Result<Self::Output, ::std::string::String> {
                #run_blocking
            }

            fn explain_args(args: &[u8]) -> ::core::option::Option<::std::string::String> {
                let checks: &[::girder::codec::ArgCheck] = &[#(::girder::codec::check_one::<#owned>),*];
                ::girder::codec::explain_args(args, Self::PARAMS, checks)
            }

            #schemas
        }
    }
}

/// The user's function as `NAME::run`, signature and body as written.
fn run_fn(func: &ItemFn) -> Tokens {
    let mut run = func.clone();
    run.sig.ident = format_ident!("run", span = func.sig.ident.span());
    run.attrs.retain(|a| !a.path().is_ident("doc"));
    let doc = format!(
        "The body of `{}` as written, called directly: no grid, no memo. In a unit test give it \
         a context from `girder::Ctx::for_tests(&node)`, whose nested calls go through `node`.",
        func.sig.ident
    );
    quote! {
        #[doc = #doc]
        #[allow(dead_code)]
        #run
    }
}

/// The `Function` bodies: decode nothing (the adapter did), bind the arguments, call `run`
/// with references for borrowed parameters, and turn `Err` into the function error's text.
fn bodies(is_async: bool, name: &LitStr, params: &[Param], fallible: Option<Span>) -> (Tokens, Tokens, Tokens) {
    let names: Vec<&Ident> = params.iter().map(|p| &p.name).collect();
    let args_pat = if params.is_empty() { quote!(_) } else { quote!((#(#names,)*)) };
    // `Borrow` reaches `&T` from `T::Owned` for every `ToOwned` type, `Deref` or not.
    let passed: Vec<Tokens> = params
        .iter()
        .map(|p| match &p.borrowed {
            Some(elem) => {
                let name = &p.name;
                quote!(::core::borrow::Borrow::<#elem>::borrow(&#name))
            }
            None => p.name.to_token_stream(),
        })
        .collect();
    let convert = |call: Tokens| {
        if let Some(error) = fallible {
            // Spanned at the error type: "`E` doesn't implement `Display`" points there.
            let map_err = quote_spanned!(error=> .map_err(::girder::error_text));
            quote!(#call #map_err)
        } else {
            quote!(::core::result::Result::Ok(#call))
        }
    };
    if is_async {
        let call = convert(quote!(Self::run(__girder_ctx, #(#passed),*).await));
        let run_async = quote! {
            ::std::boxed::Box::pin(async move {
                let #args_pat = __girder_args;
                #call
            })
        };
        let refuse = quote! {
            ::core::result::Result::Err(::std::format!("{} is async and cannot run on a blocking slot", #name))
        };
        (quote!(::girder::FnKind::Async), run_async, refuse)
    } else {
        let call = convert(quote!(Self::run(__girder_ctx, #(#passed),*)));
        let run_blocking = quote! {
            let #args_pat = __girder_args;
            #call
        };
        let refuse = quote! {
            ::std::boxed::Box::pin(async move {
                ::core::result::Result::Err(::std::format!("{} is blocking and cannot run as a task", #name))
            })
        };
        (quote!(::girder::FnKind::Blocking), refuse, run_blocking)
    }
}

/// `NAME::call` and `NAME::call_blocking`: take the parameters as written, encode them
/// (borrowed ones without a copy; the bytes are the owned values' bytes), call, decode.
fn call_helpers(vis: &syn::Visibility, ident: &Ident, name: &LitStr, params: &[Param], output: &Type) -> Tokens {
    let names: Vec<&Ident> = params.iter().map(|p| &p.name).collect();
    let written: Vec<&Type> = params.iter().map(|p| &p.written).collect();
    // An empty tuple encodes as nil; the empty argument list is an empty array.
    let args = if params.is_empty() { quote!([0u8; 0]) } else { quote!((#(#names,)*)) };
    let call_doc = format!("Calls `{}` through the grid and waits for its result.", name.value());
    let blocking_doc =
        format!("Calls `{}` through the grid, blocking this thread until its result is there.", name.value());
    let request = quote! {
        ::girder::codec::encode_canonical(&#args)
            .map(|__girder_bytes| ::girder::Request::new(
                <#ident as ::girder::Function>::NAME,
                <#ident as ::girder::Function>::VERSION,
                __girder_bytes,
            ))
            .map_err(|message| ::girder::CallError::BadArguments {
                function: ::std::string::String::from(<#ident as ::girder::Function>::NAME),
                message,
            })
    };
    quote! {
        #[doc = #call_doc]
        #[allow(dead_code)]
        #vis fn call<'__c, __C: ::girder::Caller + ?Sized>(
            __girder_caller: &'__c __C,
            #(#names: #written),*
        ) -> impl ::core::future::Future<Output = ::core::result::Result<#output, ::girder::CallError>>
               + ::core::marker::Send + use<'__c, __C> {
            // Encoded now, so the future borrows none of the arguments.
            let __girder_request = #request;
            async move {
                let __girder_bytes = __girder_caller.call_request(__girder_request?).await?;
                Self::__girder_decode(&__girder_bytes)
            }
        }

        #[doc = #blocking_doc]
        #[allow(dead_code)]
        #vis fn call_blocking<__C: ::girder::Caller + ?Sized>(
            __girder_caller: &__C,
            #(#names: #written),*
        ) -> ::core::result::Result<#output, ::girder::CallError> {
            let __girder_request = #request?;
            let __girder_bytes = __girder_caller.call_request_blocking(__girder_request)?;
            Self::__girder_decode(&__girder_bytes)
        }

        #[allow(dead_code)]
        fn __girder_decode(bytes: &[u8]) -> ::core::result::Result<#output, ::girder::CallError> {
            ::girder::codec::decode(bytes).map_err(|message| ::girder::CallError::BadResult {
                function: ::std::string::String::from(<#ident as ::girder::Function>::NAME),
                message,
            })
        }
    }
}

/// `Function::schemas`: each type's `schemars` schema when it implements `JsonSchema`, else
/// `true`. The choice is made by method resolution on the concrete type ("autoref
/// specialization"): the `JsonSchema` impl matches `&Probe<T>` as it is, the fallback only
/// after one more `&`, so it is taken only when the first does not apply.
fn schemas_fn(owned: &[&Type], output: &Type) -> Tokens {
    let probe = |ty: &Type| quote!((&__Probe::<#ty>(::core::marker::PhantomData)).__girder_schema().to_value());
    let params = owned.iter().map(|ty| probe(ty));
    let output = probe(output);
    quote! {
        fn schemas() -> ::girder::Schemas {
            struct __Probe<T>(::core::marker::PhantomData<T>);
            trait __Described {
                fn __girder_schema(&self) -> ::girder::schemars::Schema;
            }
            impl<T: ::girder::schemars::JsonSchema> __Described for __Probe<T> {
                fn __girder_schema(&self) -> ::girder::schemars::Schema {
                    ::girder::schemars::SchemaGenerator::default().into_root_schema_for::<T>()
                }
            }
            trait __Undescribed {
                fn __girder_schema(&self) -> ::girder::schemars::Schema;
            }
            impl<T> __Undescribed for &__Probe<T> {
                fn __girder_schema(&self) -> ::girder::schemars::Schema {
                    ::girder::schemars::Schema::from(true)
                }
            }
            ::girder::Schemas { params: ::std::vec![#(#params),*], output: #output }
        }
    }
}

/// `T` when `ty` is written `Result<T, E>` or `Result<T>` (any path ending in `Result`, so
/// `anyhow::Result<T>` and `std::io::Result<T>` too; the error must be `Display`), with where
/// the error type is written (`E`, or the whole type when it is implied).
fn result_ok_type(ty: &Type) -> Option<(Type, Span)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else { return None };
    match args.args.first()? {
        GenericArgument::Type(ok) if args.args.len() <= 2 => {
            let error = args.args.iter().nth(1).map_or_else(|| ty.span(), Spanned::span);
            Some((ok.clone(), error))
        }
        _ => None,
    }
}
