//! `#[pgfixture::test]`. Use it through the `pgfixture` crate, which re-exports it;
//! the generated code calls `pgfixture::__macro`, where the work is done.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, FnArg, ItemFn, Lit, LitStr, Meta, Token};

/// An async test on its worker's PostgreSQL: the test's one parameter, chosen by its
/// type, is its handle (or `#[sqlx::test]`'s two, pool and connect options). See the
/// `pgfixture` crate's documentation.
#[proc_macro_attribute]
pub fn test(args: TokenStream, item: TokenStream) -> TokenStream {
    let input = match syn::parse::<ItemFn>(item) {
        Ok(input) => input,
        Err(e) => return e.to_compile_error().into(),
    };
    match expand(args.into(), input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Where the migrations come from.
enum Migrations {
    /// `PGFIXTURE_MIGRATIONS`, else `<crate>/migrations` when it exists.
    Inferred,
    Path(LitStr),
    Disabled,
    Migrator(syn::Path),
}

struct Args {
    /// The fixture files, as paths relative to the test's source file.
    fixtures: Vec<LitStr>,
    migrations: Migrations,
    multi_thread: Option<bool>,
    worker_threads: Option<syn::LitInt>,
    /// `start_paused = true`, as `#[tokio::test]` takes it.
    start_paused: Option<syn::LitBool>,
    /// `setup = "path::to::code"` and its `setup_version = "..."`.
    setup: Option<(syn::Path, LitStr)>,
}

fn expand(args: TokenStream2, input: ItemFn) -> syn::Result<TokenStream2> {
    let metas = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(args)?;
    let args = parse_args(metas)?;
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = input;
    if let Some(attr) = attrs.iter().find(|a| a.path().is_ident("test")) {
        return Err(syn::Error::new_spanned(
            attr,
            "#[pgfixture::test] is a test attribute already: remove #[test]",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "a #[pgfixture::test] cannot be generic",
        ));
    }
    let name = &sig.ident;
    let ret = &sig.output;
    let inputs = &sig.inputs;
    let mut types = Vec::new();
    for param in inputs {
        match param {
            FnArg::Typed(arg) => types.push(&*arg.ty),
            receiver => {
                return Err(syn::Error::new_spanned(
                    receiver,
                    "a #[pgfixture::test] is a free function: remove `self`",
                ));
            }
        }
    }
    // `#[sqlx::test]`'s two parameters, pool options and connect options, are one
    // handle: the pair. Any other second parameter is an error here.
    let pair = types.len() == 2 && is_pool_options(types[0]);
    if let Some(extra) = inputs.iter().nth(if pair { 2 } else { 1 }) {
        return Err(syn::Error::new_spanned(
            extra,
            "a #[pgfixture::test] takes one parameter, its handle (pgfixture::TestDb, pgfixture::WorkerPool, sqlx::PgPool, ...), or #[sqlx::test]'s two, `opts: PgPoolOptions, connect: PgConnectOptions`: take what else you need from it, e.g. `db.url()` or `pool.connect_options()`",
        ));
    }
    let handle_type: Option<syn::Type> = match &types[..] {
        [] => None,
        [ty] => Some((*ty).clone()),
        [options, connect] => {
            Some(syn::parse_quote_spanned! {options.span()=> (#options, #connect) })
        }
        _ => unreachable!("more parameters are an error above"),
    };
    let handle_type = handle_type.as_ref();
    // How the test function is called with its handle.
    let (call, sync_call) = if pair {
        (
            quote! { |(options, connect)| ::std::boxed::Box::pin(#name(options, connect)) },
            quote! { |(options, connect)| #name(options, connect) },
        )
    } else {
        (
            quote! { |handle| ::std::boxed::Box::pin(#name(handle)) },
            quote! { #name },
        )
    };
    let is_async = sig.asyncness.is_some();

    let fixtures = args.fixtures.iter().map(|path| {
        quote_spanned! {path.span()=>
            ::pgfixture::__macro::TestFixture { path: #path, sql: ::core::include_str!(#path) }
        }
    });
    let migrations = match &args.migrations {
        Migrations::Inferred => quote! { ::pgfixture::__macro::Migrations::Inferred },
        Migrations::Path(path) => quote! { ::pgfixture::__macro::Migrations::Path(#path) },
        Migrations::Disabled => quote! { ::pgfixture::__macro::Migrations::Disabled },
        // Either sqlx major's: pgfixture runs it through its own.
        Migrations::Migrator(path) => quote_spanned! {path.span()=>
            ::pgfixture::__macro::Migrations::migrator(&#path)
        },
    };
    if handle_type.is_none() && !args.fixtures.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            "fixtures are applied through the test's handle: give the test one, e.g. `db: pgfixture::TestDb`",
        ));
    }
    if let (None, Some((path, _))) = (handle_type, &args.setup) {
        return Err(syn::Error::new_spanned(
            path,
            "setup code builds the template of the test's handle: give the test one, e.g. `db: pgfixture::TestDb`",
        ));
    }
    // The setup, as a function pointer: the same code for every test that names it.
    let setup = match &args.setup {
        Some((path, version)) => quote_spanned! {path.span()=>
            ::core::option::Option::Some(|builder: ::pgfixture::FixtureBuilder| builder.setup(#version, #path))
        },
        None => quote! { ::core::option::Option::None },
    };
    let multi_thread = args.multi_thread.unwrap_or(false);
    let worker_threads = match &args.worker_threads {
        Some(n) => quote! { ::core::option::Option::Some(#n) },
        None => quote! { ::core::option::Option::None },
    };
    if args.worker_threads.is_some() && !multi_thread {
        return Err(syn::Error::new_spanned(
            args.worker_threads.as_ref(),
            "worker_threads needs flavor = \"multi_thread\", as in #[tokio::test]",
        ));
    }
    let paused = args.start_paused.as_ref().filter(|paused| paused.value);
    if let Some(paused) = paused
        && multi_thread
    {
        return Err(syn::Error::new_spanned(
            paused,
            "start_paused needs the current_thread flavor, as in #[tokio::test]: remove flavor = \"multi_thread\"",
        ));
    }
    // The runtime, as `#[tokio::test]` builds it. A paused clock is asked for in the
    // test's crate: `start_paused` needs tokio's `test-util` feature, which the test
    // crate turns on, as for `#[tokio::test(start_paused = true)]`.
    let runtime = match paused {
        Some(paused) => quote_spanned! {paused.span()=>
            ::pgfixture::__macro::runtime_with(#multi_thread, #worker_threads, |builder| {
                builder.start_paused(true);
            })
        },
        None => quote! { ::pgfixture::__macro::runtime(#multi_thread, #worker_threads) },
    };
    let test_args = quote! {
        ::pgfixture::__macro::TestArgs {
            name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
            file: ::core::file!(),
            manifest_dir: ::core::env!("CARGO_MANIFEST_DIR"),
            fixtures: &[#(#fixtures),*],
            migrations: #migrations,
            setup: #setup,
        }
    };
    if !is_async {
        if let Some(paused) = &args.start_paused {
            return Err(syn::Error::new_spanned(
                paused,
                "start_paused is for async tests: make the test an `async fn`",
            ));
        }
        if args.multi_thread.is_some() {
            return Err(syn::Error::new(
                Span::call_site(),
                "flavor is for async tests: make the test an `async fn`",
            ));
        }
    }
    let body = match (handle_type, is_async) {
        // The body's future is type-erased (pinned, as `#[tokio::test]` does), so that
        // the runtime's `block_on` and the code around it are compiled once per
        // handle and output type, not once per test.
        (None, true) => quote! {
            let body = ::core::pin::pin!(#name());
            ::pgfixture::__macro::run_plain(
                #test_args,
                #runtime,
                body,
            )
        },
        (None, false) => quote! { #name() },
        (Some(ty), true) => quote_spanned! {ty.span()=>
            ::pgfixture::__macro::run::<#ty, _>(
                #test_args,
                #runtime,
                #call,
            )
        },
        (Some(ty), false) => {
            quote_spanned! {ty.span()=>
                ::pgfixture::__macro::run_sync::<#ty, _>(#test_args, #sync_call)
            }
        }
    };
    // The same checks outside the test function, which exists in test builds only:
    // misuse is an error in every build (a plain `cargo build` of the file, trybuild).
    let handle_check = handle_type.map(|ty| {
        if is_async {
            quote_spanned! {ty.span()=> ::pgfixture::__macro::assert_handle::<#ty>(); }
        } else {
            quote_spanned! {ty.span()=> ::pgfixture::__macro::assert_sync_handle::<#ty>(); }
        }
    });
    let fixture_checks = args.fixtures.iter().map(|path| {
        quote_spanned! {path.span()=> let _: &str = ::core::include_str!(#path); }
    });
    let migrator_check = match &args.migrations {
        Migrations::Migrator(_) => Some(quote! { let _ = #migrations; }),
        _ => None,
    };
    let asyncness = &sig.asyncness;
    Ok(quote! {
        #(#attrs)*
        #[::core::prelude::v1::test]
        #vis fn #name() #ret {
            #asyncness fn #name(#inputs) #ret #block
            #body
        }

        // Not in test builds, where the test function itself checks the same.
        #[cfg(not(test))]
        const _: () = {
            #[allow(dead_code)]
            fn check() {
                #handle_check
                #migrator_check
                #(#fixture_checks)*
            }
        };
    })
}

fn parse_args(metas: Punctuated<Meta, Token![,]>) -> syn::Result<Args> {
    let mut args = Args {
        fixtures: Vec::new(),
        migrations: Migrations::Inferred,
        multi_thread: None,
        worker_threads: None,
        start_paused: None,
        setup: None,
    };
    let mut migrations_set = false;
    let (mut setup, mut setup_version): (Option<syn::Path>, Option<LitStr>) = (None, None);
    for meta in metas {
        match meta {
            Meta::List(list) if list.path.is_ident("fixtures") => {
                args.fixtures.extend(parse_fixtures(&list)?);
            }
            Meta::NameValue(nv) if nv.path.is_ident("migrations") => {
                if std::mem::replace(&mut migrations_set, true) {
                    return Err(syn::Error::new_spanned(
                        nv,
                        "only one `migrations` or `migrator` argument",
                    ));
                }
                args.migrations = match literal(&nv.value) {
                    Some(Lit::Bool(b)) if !b.value => Migrations::Disabled,
                    Some(Lit::Bool(b)) => {
                        return Err(syn::Error::new_spanned(
                            b,
                            "`migrations = true` is the default: remove it",
                        ));
                    }
                    Some(Lit::Str(path)) => {
                        check_migrations_dir(&path)?;
                        Migrations::Path(path)
                    }
                    _ => {
                        return Err(syn::Error::new_spanned(
                            nv.value,
                            "expected `migrations = \"path\"` (relative to the crate) or `migrations = false`",
                        ));
                    }
                };
            }
            Meta::NameValue(nv) if nv.path.is_ident("migrator") => {
                if std::mem::replace(&mut migrations_set, true) {
                    return Err(syn::Error::new_spanned(
                        nv,
                        "only one `migrations` or `migrator` argument",
                    ));
                }
                let Some(Lit::Str(path)) = literal(&nv.value) else {
                    return Err(syn::Error::new_spanned(
                        nv.value,
                        "expected `migrator = \"path::TO::MIGRATOR\"`, a static sqlx::migrate::Migrator",
                    ));
                };
                args.migrations = Migrations::Migrator(path.parse()?);
            }
            Meta::NameValue(nv) if nv.path.is_ident("flavor") => {
                args.multi_thread = Some(match literal(&nv.value) {
                    Some(Lit::Str(s)) if s.value() == "multi_thread" => true,
                    Some(Lit::Str(s)) if s.value() == "current_thread" => false,
                    _ => {
                        return Err(syn::Error::new_spanned(
                            nv.value,
                            "expected flavor = \"current_thread\" or \"multi_thread\"",
                        ));
                    }
                });
            }
            Meta::NameValue(nv) if nv.path.is_ident("start_paused") => {
                let Some(Lit::Bool(paused)) = literal(&nv.value) else {
                    return Err(syn::Error::new_spanned(
                        nv.value,
                        "expected start_paused = true",
                    ));
                };
                args.start_paused = Some(paused);
            }
            Meta::NameValue(nv) if nv.path.is_ident("setup") => {
                let Some(Lit::Str(path)) = literal(&nv.value) else {
                    return Err(syn::Error::new_spanned(
                        nv.value,
                        "expected `setup = \"path::to::code\"`, an async fn taking the pgfixture::DatabaseUrl of the template being built",
                    ));
                };
                setup = Some(path.parse()?);
            }
            Meta::NameValue(nv) if nv.path.is_ident("setup_version") => {
                let Some(Lit::Str(version)) = literal(&nv.value) else {
                    return Err(syn::Error::new_spanned(
                        nv.value,
                        "expected `setup_version = \"...\"`",
                    ));
                };
                setup_version = Some(version);
            }
            Meta::NameValue(nv) if nv.path.is_ident("worker_threads") => {
                let Some(Lit::Int(n)) = literal(&nv.value) else {
                    return Err(syn::Error::new_spanned(
                        nv.value,
                        "expected worker_threads = <a number>",
                    ));
                };
                args.worker_threads = Some(n);
            }
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    "expected `fixtures(\"name\", ...)`, `fixtures(path = \"dir\", scripts(\"name\", ...))`, `migrations = \"path\" | false`, `migrator = \"path::TO::MIGRATOR\"`, `setup = \"path::to::code\", setup_version = \"...\"`, `flavor = \"multi_thread\"`, `worker_threads = N` or `start_paused = true`",
                ));
            }
        }
    }
    args.setup = match (setup, setup_version) {
        (Some(path), Some(version)) => Some((path, version)),
        (None, None) => None,
        (Some(path), None) => {
            return Err(syn::Error::new_spanned(
                path,
                "setup needs `setup_version = \"...\"`: the version keys the template the code builds; change it whenever the code would build something else",
            ));
        }
        (None, Some(version)) => {
            return Err(syn::Error::new_spanned(
                version,
                "setup_version without `setup = \"path::to::code\"`",
            ));
        }
    };
    Ok(args)
}

/// Whether `ty` names sqlx's pool options (`PgPoolOptions`, `PoolOptions<Postgres>`),
/// the first of `#[sqlx::test]`'s two parameters. By name only: the handle's trait
/// checks the types.
fn is_pool_options(ty: &syn::Type) -> bool {
    match ty {
        syn::Type::Path(path) => path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "PgPoolOptions" || s.ident == "PoolOptions"),
        syn::Type::Group(group) => is_pool_options(&group.elem),
        syn::Type::Paren(paren) => is_pool_options(&paren.elem),
        _ => false,
    }
}

fn literal(expr: &Expr) -> Option<Lit> {
    match expr {
        Expr::Lit(ExprLit { lit, .. }) => Some(lit.clone()),
        Expr::Group(group) => literal(&group.expr),
        _ => None,
    }
}

/// The fixture files of `fixtures(...)`, as `#[sqlx::test]` reads them: names in the
/// test file's `fixtures/` directory (`.sql` added when missing), paths with a `/`
/// taken as they are, or `path = "dir", scripts("a", "b")`.
fn parse_fixtures(list: &syn::MetaList) -> syn::Result<Vec<LitStr>> {
    let mut dir: Option<LitStr> = None;
    let mut scripts: Vec<LitStr> = Vec::new();
    let nested = list.parse_nested_meta(|meta| {
        if meta.path.is_ident("path") {
            if dir.is_some() || !scripts.is_empty() {
                return Err(meta.error("`path` must come first, once"));
            }
            dir = Some(meta.value()?.parse()?);
            Ok(())
        } else if meta.path.is_ident("scripts") {
            if dir.is_none() {
                return Err(meta.error("`scripts(...)` goes with `path = \"dir\"` before it"));
            }
            let content;
            syn::parenthesized!(content in meta.input);
            scripts.extend(Punctuated::<LitStr, Token![,]>::parse_terminated(&content)?);
            Ok(())
        } else {
            Err(meta.error("expected `path = \"dir\"` or `scripts(...)`"))
        }
    });
    if nested.is_ok() {
        let Some(dir) = dir else {
            return Err(syn::Error::new_spanned(
                list,
                "fixtures(path = ...) needs scripts(...)",
            ));
        };
        return Ok(scripts
            .iter()
            .map(|s| {
                LitStr::new(
                    &format!("{}/{}", dir.value(), with_sql(&s.value())),
                    s.span(),
                )
            })
            .collect());
    }
    let names = list.parse_args_with(Punctuated::<LitStr, Token![,]>::parse_terminated)?;
    Ok(names
        .iter()
        .map(|name| {
            let value = name.value();
            let path = if std::path::Path::new(&value).components().count() > 1 {
                value
            } else {
                format!("fixtures/{}", with_sql(&value))
            };
            LitStr::new(&path, name.span())
        })
        .collect())
}

fn with_sql(name: &str) -> String {
    if std::path::Path::new(name).extension().is_some() {
        name.to_owned()
    } else {
        format!("{name}.sql")
    }
}

/// A migrations folder that does not exist is an error here, where it is written, as
/// sqlx's `migrate!` gives.
fn check_migrations_dir(path: &LitStr) -> syn::Result<()> {
    let Ok(manifest) = std::env::var("CARGO_MANIFEST_DIR") else {
        return Ok(());
    };
    let dir = std::path::Path::new(&manifest).join(path.value());
    if dir.is_dir() {
        Ok(())
    } else {
        Err(syn::Error::new_spanned(
            path,
            format!(
                "no migrations folder {} (the path is relative to the crate's directory)",
                dir.display()
            ),
        ))
    }
}
