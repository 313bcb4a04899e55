//! libnftables in-process: the library `nft` itself is built on, loaded at run time with
//! `dlopen("libnftables.so.1")` (no link-time dependency: a host without it falls back to
//! running `nft`, see the `kernel` crate). A [`Ctx`] parses nft's own syntax and sends each
//! command buffer to the kernel as one netlink transaction, exactly as `nft -f -` does, without
//! the fork, exec and dynamic loading of a process per batch.
//!
//! A context opens its `NETLINK_NETFILTER` socket in `nft_ctx_new`, so it stays bound to the
//! network namespace of the thread that created it, whichever thread runs its commands later.
//! libnftables keeps process-global state (its interface cache), so callers must not run two
//! contexts at the same time: [`Ctx`] is `Send` but not `Sync`, and the kernel crate serialises
//! every call behind one lock.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

/// The library's file name (the runtime package of nftables installs it with `nft`).
pub const LIBRARY: &str = "libnftables.so.1";

/// `NFT_CTX_DEFAULT`: a context with a netlink socket.
const NFT_CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON` (libnftables.h): list commands print JSON, as `nft -j`.
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

/// Errors of libnftables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NftablesError {
    /// The library or one of its symbols could not be loaded.
    #[error(
        "cannot load {LIBRARY}: {0} (install the nftables runtime library, e.g. Debian's libnftables1)"
    )]
    Unavailable(String),
    /// `nft_ctx_new` returned no context (out of memory or no netlink socket).
    #[error("libnftables could not create a context (netlink socket refused?)")]
    Context,
    /// The commands contain a NUL byte, which nft's syntax never does.
    #[error("nft commands contain a NUL byte at offset {0}; remove it")]
    Nul(usize),
    /// nft refused the commands (parse, evaluation or the kernel): its error text.
    #[error("{0}")]
    Refused(String),
}

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
type SetDryRun = unsafe extern "C" fn(*mut c_void, bool);
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);

/// The library's entry points portico uses.
struct Library {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output_buffer: CtxStr,
    error_buffer: CtxStr,
    run_cmd: RunCmd,
    set_dry_run: SetDryRun,
    output_set_flags: SetFlags,
}

/// The last `dlerror()` text.
fn dlerror() -> String {
    #[allow(unsafe_code)]
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, valid until the
    // next dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

impl Library {
    fn load() -> Result<Self, NftablesError> {
        let name = CString::new(LIBRARY).expect("no NUL in the library name");
        #[allow(unsafe_code)]
        // SAFETY: dlopen with a valid C string; the handle is never closed, so the function
        // pointers taken from it stay valid for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(NftablesError::Unavailable(dlerror()));
        }
        let sym = |s: &str| -> Result<*mut c_void, NftablesError> {
            let c = CString::new(s).expect("no NUL in a symbol name");
            #[allow(unsafe_code)]
            // SAFETY: a valid handle from dlopen above and a valid C string.
            let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
            if p.is_null() {
                Err(NftablesError::Unavailable(format!("{s}: {}", dlerror())))
            } else {
                Ok(p)
            }
        };
        #[allow(unsafe_code)]
        // SAFETY: each symbol is cast to the C prototype libnftables.h declares for it
        // (stable ABI of libnftables.so.1): nft_ctx_new(uint32_t), nft_ctx_free(ctx),
        // nft_ctx_buffer_output/error(ctx) -> int, nft_ctx_get_output/error_buffer(ctx) ->
        // const char *, nft_run_cmd_from_buffer(ctx, const char *) -> int,
        // nft_ctx_set_dry_run(ctx, bool), nft_ctx_output_set_flags(ctx, unsigned int).
        unsafe {
            Ok(Self {
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym("nft_ctx_new")?),
                ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym("nft_ctx_free")?),
                buffer_output: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                    "nft_ctx_buffer_output",
                )?),
                buffer_error: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                    "nft_ctx_buffer_error",
                )?),
                output_buffer: std::mem::transmute::<*mut c_void, CtxStr>(sym(
                    "nft_ctx_get_output_buffer",
                )?),
                error_buffer: std::mem::transmute::<*mut c_void, CtxStr>(sym(
                    "nft_ctx_get_error_buffer",
                )?),
                run_cmd: std::mem::transmute::<*mut c_void, RunCmd>(sym(
                    "nft_run_cmd_from_buffer",
                )?),
                set_dry_run: std::mem::transmute::<*mut c_void, SetDryRun>(sym(
                    "nft_ctx_set_dry_run",
                )?),
                output_set_flags: std::mem::transmute::<*mut c_void, SetFlags>(sym(
                    "nft_ctx_output_set_flags",
                )?),
            })
        }
    }
}

/// The library, loaded once per process (`Err` when this host does not have it).
fn library() -> Result<&'static Library, NftablesError> {
    static LIB: OnceLock<Result<Library, NftablesError>> = OnceLock::new();
    LIB.get_or_init(Library::load)
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether libnftables can be loaded here.
pub fn available() -> Result<(), NftablesError> {
    library().map(|_| ())
}

/// How [`Ctx::run`] runs its commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Check only, change nothing (`nft -c`).
    pub dry_run: bool,
    /// Print list output as JSON (`nft -j`).
    pub json: bool,
}

/// One libnftables context, with its output and errors buffered (nothing goes to stdout or
/// stderr). Bound to the network namespace of the thread that created it.
pub struct Ctx {
    lib: &'static Library,
    ctx: *mut c_void,
}

// SAFETY: a context is plain heap state plus a netlink socket; libnftables does not tie it to
// the creating thread. Ctx is not Sync (every call takes &mut self), so one thread at a time
// uses it.
#[allow(unsafe_code)]
unsafe impl Send for Ctx {}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

impl Ctx {
    /// Loads the library (once) and creates a context whose netlink socket lives in the
    /// calling thread's network namespace.
    pub fn new() -> Result<Self, NftablesError> {
        let lib = library()?;
        #[allow(unsafe_code)]
        // SAFETY: nft_ctx_new takes flags by value and returns an owned context or NULL.
        let ctx = unsafe { (lib.ctx_new)(NFT_CTX_DEFAULT) };
        if ctx.is_null() {
            return Err(NftablesError::Context);
        }
        let this = Self { lib, ctx };
        #[allow(unsafe_code)]
        // SAFETY: ctx is a live context owned by `this`.
        let rc = unsafe { (lib.buffer_output)(ctx) | (lib.buffer_error)(ctx) };
        if rc != 0 {
            return Err(NftablesError::Context); // `this` frees the context
        }
        Ok(this)
    }

    /// Runs `commands` (nft syntax, as in a file for `nft -f`) as one transaction; returns
    /// what nft printed (list commands), or its error text when it refused them.
    pub fn run(&mut self, commands: &str, opts: RunOptions) -> Result<String, NftablesError> {
        let c = CString::new(commands).map_err(|e| NftablesError::Nul(e.nul_position()))?;
        let lib = self.lib;
        #[allow(unsafe_code)]
        // SAFETY: self.ctx is live and used by this thread only (&mut self); `c` outlives the
        // call; the returned buffers are NUL-terminated strings owned by the context, valid
        // until the next call on it, and copied before this function returns.
        let (rc, out, err) = unsafe {
            (lib.set_dry_run)(self.ctx, opts.dry_run);
            (lib.output_set_flags)(self.ctx, if opts.json { NFT_CTX_OUTPUT_JSON } else { 0 });
            let rc = (lib.run_cmd)(self.ctx, c.as_ptr());
            let text = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let out = text((lib.output_buffer)(self.ctx));
            let err = text((lib.error_buffer)(self.ctx));
            (rc, out, err)
        };
        if rc == 0 {
            Ok(out)
        } else {
            let err = err.trim();
            Err(NftablesError::Refused(if err.is_empty() {
                format!("nft_run_cmd_from_buffer returned {rc}")
            } else {
                err.to_string()
            }))
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: self.ctx came from nft_ctx_new and is freed exactly once, here.
        unsafe {
            (self.lib.ctx_free)(self.ctx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_commands_return_nft_error_text_and_nothing_changes() {
        if available().is_err() {
            crate::skip_test("needs libnftables.so.1");
            return;
        }
        if !crate::is_root() {
            crate::skip_test("needs root (nftables)");
            return;
        }
        // a dry run changes nothing, so it is safe in the host namespace
        let mut ctx = Ctx::new().expect("context");
        let dry = RunOptions {
            dry_run: true,
            json: false,
        };
        ctx.run(
            "add table inet pk_sys_probe\nadd chain inet pk_sys_probe c\n",
            dry,
        )
        .expect("a valid batch checks");
        let e = ctx
            .run(
                "add table inet pk_sys_probe\nadd chain inet pk_sys_probe c { bogus }\n",
                dry,
            )
            .unwrap_err();
        assert!(
            matches!(&e, NftablesError::Refused(t) if t.contains("syntax error")),
            "{e}"
        );
        assert_eq!(ctx.run("a\0b", dry), Err(NftablesError::Nul(1)));
        // the dry run created nothing
        let out = ctx
            .run(
                "list tables",
                RunOptions {
                    dry_run: false,
                    json: true,
                },
            )
            .expect("list tables");
        assert!(out.starts_with("{\"nftables\""), "{out}");
        assert!(!out.contains("pk_sys_probe"), "{out}");
    }
}
