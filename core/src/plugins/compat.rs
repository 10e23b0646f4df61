//! Whether a plugin library fits this engine, and why not in one line:
//! the plugin API version in its header (the 0.x rule), the layout of the
//! types that cross the boundary (abi_stable's check, reduced to its first
//! real mismatch), and the values of the constants that cross it.
//!
//! abi_stable's own errors are exact but long (a layout mismatch prints a
//! thousand lines, and a newer minor version is reported as one); the
//! loader logs them in full at debug level and shows the user a
//! [`Refusal`].

use std::path::PathBuf;

use abi_stable::abi_stability::abi_checking::{
    check_layout_compatibility, AbiInstability, AbiInstabilityError, AbiInstabilityErrors,
};
use abi_stable::library::RootModule;
use abi_stable::sabi_types::{VersionNumber, VersionStrings};
use abi_stable::type_layout::{TLField, TLFieldOrFunction, TypeLayout};
use phaul_plugin_api::{AbiConstant, PluginModRef};

/// Why a library in a plugin directory was not loaded. The `Display` form
/// is the one line `phaul` prints after the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The plugin directory could not be listed.
    #[error("cannot read the plugin directory: {0}")]
    UnreadableDir(String),
    /// The dynamic loader refused the file.
    #[error("cannot be loaded: {0}")]
    CannotOpen(String),
    /// A shared object without an abi_stable root module.
    #[error("not a phaul plugin: it exports no abi_stable root module")]
    NotAPlugin,
    /// Built against an incompatible phaul-plugin-api version.
    #[error("built against phaul-plugin-api {plugin}, this phaul speaks {engine} ({advice})")]
    Version {
        /// The version in the library's header.
        plugin: String,
        /// What this engine accepts (`0.2`).
        engine: String,
        /// What to do about it.
        advice: String,
    },
    /// The version in the library's header does not parse.
    #[error("has an unreadable plugin API version ({0}): rebuild it against phaul-plugin-api {1}")]
    UnreadableVersion(String, String),
    /// Same version, but a type crossing the boundary has another layout.
    #[error(
        "built against phaul-plugin-api {plugin}, but its types differ from this phaul's: \
         {mismatch} (the plugin or this phaul was built against a modified \
         phaul-plugin-api {engine}: rebuild the driver against the released one)"
    )]
    Layout {
        /// The version in the library's header.
        plugin: String,
        /// The first mismatch, e.g. `CriuOpts.empty_ns is u64 in the plugin, u32 here`.
        mismatch: String,
        /// This engine's phaul-plugin-api version.
        engine: String,
    },
    /// Same version and layout, but a constant crossing the boundary has
    /// another value.
    #[error(
        "built against phaul-plugin-api {plugin}, but its constants differ from this phaul's: \
         {mismatch} (the plugin or this phaul was built against a modified \
         phaul-plugin-api {engine}: rebuild the driver against the released one)"
    )]
    Constants {
        /// The version in the library's header.
        plugin: String,
        /// The first mismatch, e.g. `Capabilities::LIVE is 1 << 6 in the plugin, 1 << 3 here`.
        mismatch: String,
        /// This engine's phaul-plugin-api version.
        engine: String,
    },
    /// The root module has no `abi_constants` entry point.
    #[error(
        "exports no table of its ABI constants, so its capability bits and error codes \
         cannot be checked: rebuild it against phaul-plugin-api {0} with export_driver!"
    )]
    NoConstants(String),
    /// Built with an abi_stable whose header is not 0.11's.
    #[error("was built with an incompatible abi_stable ({0}): rebuild it with abi_stable 0.11")]
    AbiStable(String),
    /// Built by a compiler whose C ABI differs.
    #[error("was built by a compiler with a different C ABI: rebuild it")]
    CAbi,
    /// The root module's constructor or the driver's `info` failed.
    #[error("failed to initialise: {0}")]
    Init(String),
    /// The htype name is empty or has characters other than letters,
    /// digits, `-` and `_`.
    #[error("declares an invalid htype name `{0}` (use letters, digits, - and _)")]
    InvalidName(String),
    /// Another file already provides the htype.
    #[error("declares htype `{htype}`, which {} already provides: remove one of the two", first.display())]
    Duplicate {
        /// The htype name.
        htype: String,
        /// The file that provides it.
        first: PathBuf,
    },
}

impl Refusal {
    /// A short stable name for the kind of refusal (`version`, `layout`,
    /// `constants`, ...), for `phaul htypes --json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::UnreadableDir(_) => "unreadable-dir",
            Refusal::CannotOpen(_) => "cannot-open",
            Refusal::NotAPlugin => "not-a-plugin",
            Refusal::Version { .. } | Refusal::UnreadableVersion(..) => "version",
            Refusal::Layout { .. } => "layout",
            Refusal::Constants { .. } | Refusal::NoConstants(_) => "constants",
            Refusal::AbiStable(_) | Refusal::CAbi => "abi-stable",
            Refusal::Init(_) => "init",
            Refusal::InvalidName(_) => "invalid-name",
            Refusal::Duplicate { .. } => "duplicate",
        }
    }
}

/// The phaul-plugin-api version this engine was built against.
pub fn engine_version() -> VersionStrings {
    PluginModRef::VERSION_STRINGS
}

/// What this engine accepts, as users read it: `0.2` while the major
/// version is 0, `1.x` after.
fn speaks(v: &VersionNumber) -> String {
    if v.major == 0 {
        format!("{}.{}", v.major, v.minor)
    } else {
        format!("{}.x", v.major)
    }
}

/// Checks the phaul-plugin-api version a library was built against (from
/// its header, before abi_stable compares any layout): the same major
/// version and, while it is 0, the same minor version. abi_stable itself
/// would accept a newer minor and then report its types as a layout
/// mismatch.
pub fn check_version(plugin: VersionStrings) -> Result<(), Refusal> {
    let engine = VersionNumber::new(engine_version()).expect("this crate's own version parses");
    let found = VersionNumber::new(plugin).map_err(|e| {
        Refusal::UnreadableVersion(format!("{plugin}: {e:?}"), engine_version().to_string())
    })?;
    if found.major == engine.major && (engine.major != 0 || found.minor == engine.minor) {
        return Ok(());
    }
    Err(version_refusal(&found, plugin.to_string()))
}

/// The refusal of a plugin built against phaul-plugin-api `found`
/// (`shown` as the header spells it), saying what to do.
pub fn version_refusal(found: &VersionNumber, shown: String) -> Refusal {
    let engine = VersionNumber::new(engine_version()).expect("this crate's own version parses");
    let newer = (found.major, found.minor) > (engine.major, engine.minor);
    let advice = if newer {
        format!(
            "the driver is newer than this phaul: use a phaul that speaks {}, or rebuild the \
             driver against phaul-plugin-api {}",
            speaks(found),
            speaks(&engine)
        )
    } else {
        format!(
            "rebuild the driver against phaul-plugin-api {}",
            speaks(&engine)
        )
    };
    Refusal::Version {
        plugin: shown,
        engine: speaks(&engine),
        advice,
    }
}

/// The first real mismatch between the layout this engine expects and the
/// one a library exports, in one phrase (`CriuOpts.empty_ns is u64 in the
/// plugin, u32 here`), or `None` if the layouts are compatible.
pub fn layout_mismatch(
    expected: &'static TypeLayout,
    found: &'static TypeLayout,
) -> Option<String> {
    check_layout_compatibility(expected, found)
        .err()
        .map(|errors| first_mismatch(&errors))
}

/// Size and alignment differences follow from a change further in (a
/// field of another type makes its struct bigger), so a mismatch of
/// another kind, where there is one, is the one to name.
fn is_consequence(e: &AbiInstability) -> bool {
    matches!(e, AbiInstability::Size(_) | AbiInstability::Alignment(_))
}

fn first_mismatch(errors: &AbiInstabilityErrors) -> String {
    let with_errs = || errors.errors.iter().filter(|e| !e.errs.is_empty());
    let chosen = with_errs()
        .find(|e| e.errs.iter().any(|x| !is_consequence(x)))
        .or_else(|| with_errs().next());
    let Some(error) = chosen else {
        return format!("{} does not match", errors.interface.name());
    };
    let what = error
        .errs
        .iter()
        .find(|x| !is_consequence(x))
        .unwrap_or(&error.errs[0]);
    describe(error, what, errors.interface)
}

/// Field names abi_stable gives to places that are not fields a user
/// wrote: tuple positions, function returns and parameters, the pointee
/// of a reference.
fn is_structural(name: &str) -> bool {
    name == "__returns"
        || name.chars().all(|c| c.is_ascii_digit())
        || name
            .strip_prefix("field_")
            .or_else(|| name.strip_prefix("param_"))
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
}

/// A user-facing type name: abi_stable's generated names (`VTable`,
/// `FfiDriver_TO`) are shown as the trait they belong to.
fn type_name(layout: &TypeLayout, fields: &[&TLField]) -> String {
    let name = layout.name();
    if name.starts_with("VTable") {
        // The vtable of the nearest trait object on the way in.
        if let Some(to) = fields
            .iter()
            .rev()
            .map(|f| f.layout().name())
            .find(|n| n.ends_with("_TO"))
        {
            return format!("{} (trait)", to.trim_end_matches("_TO"));
        }
    }
    name.trim_end_matches("_TO").to_string()
}

/// Where an error is: `Type.field`, or `Type` when the innermost step is
/// not a named field.
fn location(error: &AbiInstabilityError, root: &TypeLayout) -> String {
    let fields: Vec<&TLField> = error
        .stack_trace
        .iter()
        .filter_map(|step| match &step.expected {
            TLFieldOrFunction::Field(f) => Some(f),
            TLFieldOrFunction::Function(_) => None,
        })
        .collect();
    let Some((last, before)) = fields.split_last() else {
        return type_name(root, &[]);
    };
    if is_structural(last.name()) {
        return type_name(last.layout(), before);
    }
    let owner = before.split_last().map_or_else(
        || type_name(root, &[]),
        |(o, rest)| type_name(o.layout(), rest),
    );
    format!("{owner}.{}", last.name())
}

fn describe(error: &AbiInstabilityError, what: &AbiInstability, root: &TypeLayout) -> String {
    use AbiInstability as AI;
    let at = location(error, root);
    match what {
        AI::Name(v) => format!("{at} is {} in the plugin, {} here", v.found, v.expected),
        AI::Size(v) => format!(
            "{at} is {} bytes in the plugin, {} here",
            v.found, v.expected
        ),
        AI::Alignment(v) => format!(
            "{at} is aligned to {} bytes in the plugin, {} here",
            v.found, v.expected
        ),
        AI::FieldCountMismatch(v) => format!(
            "{at} has {} fields in the plugin, {} here",
            v.found, v.expected
        ),
        AI::UnexpectedField(v) => format!(
            "{at} has a field `{}` in the plugin where this phaul has `{}`",
            v.found.name(),
            v.expected.name()
        ),
        AI::TooManyVariants(v) => format!(
            "{at} has {} variants in the plugin, {} here",
            v.found, v.expected
        ),
        AI::UnexpectedVariant(v) => format!(
            "{at} has a variant `{}` in the plugin where this phaul has `{}`",
            v.found, v.expected
        ),
        AI::EnumDiscriminant(v) => format!(
            "{at} has the discriminants {:?} in the plugin, {:?} here",
            v.found, v.expected
        ),
        AI::Package(v) => format!(
            "{at} comes from the crate {} in the plugin, {} here",
            v.found, v.expected
        ),
        AI::PackageVersion(v) => format!(
            "{at} comes from phaul-plugin-api {} in the plugin, {} here",
            v.found, v.expected
        ),
        AI::MismatchedPrimitive(v) => format!(
            "{at} is the primitive {:?} in the plugin, {:?} here",
            v.found, v.expected
        ),
        AI::MismatchedPrefixSize(v) => format!(
            "{at} has {} prefix fields in the plugin, {} here",
            v.found, v.expected
        ),
        AI::ReprAttr(v) => format!("{at} is {:?} in the plugin, {:?} here", v.found, v.expected),
        AI::TLDataDiscriminant(v) => format!(
            "{at} is a {:?} in the plugin, a {:?} here",
            v.found, v.expected
        ),
        other => {
            let kind = format!("{other:?}");
            let kind = kind.split(['(', ' ', '{']).next().unwrap_or("mismatch");
            format!("{at}: {kind}")
        }
    }
}

fn show_value(c: &AbiConstant) -> String {
    if c.type_name() == "Capabilities" && c.value.is_power_of_two() {
        format!("1 << {}", c.value.trailing_zeros())
    } else {
        c.value.to_string()
    }
}

/// Compares a plugin's boundary constants with this engine's: a constant
/// both know must have the same value, and one value may not stand for
/// two differently named constants of the same type. Constants only one
/// side knows are compatible (capabilities and error codes are sets that
/// grow). Returns the first mismatch in one phrase.
pub fn constants_mismatch(engine: &[AbiConstant], plugin: &[AbiConstant]) -> Option<String> {
    let here = |name: &str| engine.iter().find(|c| c.name.as_str() == name);
    let there = |name: &str| plugin.iter().find(|c| c.name.as_str() == name);
    for p in plugin {
        if let Some(e) = here(p.name.as_str()) {
            if e.value != p.value {
                return Some(format!(
                    "{} is {} in the plugin, {} here",
                    p.name,
                    show_value(p),
                    show_value(e)
                ));
            }
            continue;
        }
        if let Some(e) = engine.iter().find(|e| {
            e.type_name() == p.type_name() && e.value == p.value && there(e.name.as_str()).is_none()
        }) {
            return Some(format!(
                "{} in the plugin is {} here (both {})",
                p.name,
                e.name,
                show_value(p)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use abi_stable::std_types::RStr;
    use abi_stable::StableAbi;

    fn c(name: &'static str, value: u64) -> AbiConstant {
        AbiConstant {
            name: RStr::from_str(name),
            value,
        }
    }

    #[test]
    fn versions_follow_the_0x_rule() {
        let v = |s: &'static str| VersionStrings::new(s);
        let engine = engine_version();
        assert!(check_version(engine).is_ok());
        let engine_n = VersionNumber::new(engine).unwrap();
        let (major, minor) = (engine_n.major, engine_n.minor);
        let same_minor: &'static str = Box::leak(format!("{major}.{minor}.99").into_boxed_str());
        assert!(
            check_version(v(same_minor)).is_ok(),
            "a patch release loads"
        );
        let next: &'static str = Box::leak(format!("{major}.{}.0", minor + 1).into_boxed_str());
        let e = check_version(v(next)).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "built against phaul-plugin-api {next}, this phaul speaks {major}.{minor} ("
            )),
            "{e}"
        );
        assert!(e.contains("newer than this phaul"), "{e}");
        let e = check_version(v("0.0.7")).unwrap_err().to_string();
        assert!(
            e.contains("rebuild the driver against phaul-plugin-api"),
            "{e}"
        );
        assert_eq!(check_version(v("0.0.7")).unwrap_err().kind(), "version");
        assert!(matches!(
            check_version(v("x.y")),
            Err(Refusal::UnreadableVersion(..))
        ));
    }

    mod here {
        use abi_stable::StableAbi;
        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Opts {
            pub a: u32,
            pub empty_ns: u32,
        }
        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Outer {
            pub flag: bool,
            pub opts: Opts,
        }
    }
    mod there {
        use abi_stable::StableAbi;
        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Opts {
            pub a: u32,
            pub empty_ns: u64,
        }
        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Outer {
            pub flag: bool,
            pub opts: Opts,
        }
    }
    mod fewer {
        use abi_stable::StableAbi;
        #[repr(C)]
        #[derive(StableAbi)]
        pub struct Opts {
            pub a: u32,
        }
    }

    #[test]
    fn a_layout_mismatch_names_the_field_inside_the_type() {
        let m = layout_mismatch(here::Outer::LAYOUT, there::Outer::LAYOUT).unwrap();
        assert_eq!(m, "Opts.empty_ns is u64 in the plugin, u32 here");
        let m = layout_mismatch(here::Opts::LAYOUT, fewer::Opts::LAYOUT).unwrap();
        assert_eq!(m, "Opts has 1 fields in the plugin, 2 here");
        assert_eq!(
            layout_mismatch(here::Outer::LAYOUT, here::Outer::LAYOUT),
            None
        );
    }

    #[test]
    fn constants_must_agree_where_both_sides_know_them() {
        let engine = [c("Capabilities::LIVE", 8), c("ErrorCode::FAILED", 1)];
        assert_eq!(constants_mismatch(&engine, &engine), None);
        assert_eq!(
            constants_mismatch(&engine, &[c("Capabilities::LIVE", 64)]).unwrap(),
            "Capabilities::LIVE is 1 << 6 in the plugin, 1 << 3 here"
        );
        // Additions on either side are compatible...
        let newer = [c("Capabilities::LIVE", 8), c("Capabilities::LAZY", 16)];
        assert_eq!(constants_mismatch(&engine, &newer), None);
        // ...unless a value means something else here.
        let renamed = [c("Capabilities::RUNNING", 8)];
        assert_eq!(
            constants_mismatch(&engine, &renamed).unwrap(),
            "Capabilities::RUNNING in the plugin is Capabilities::LIVE here (both 1 << 3)"
        );
        assert_eq!(
            constants_mismatch(&engine, &[c("ErrorCode::FAILED", 9)]).unwrap(),
            "ErrorCode::FAILED is 9 in the plugin, 1 here"
        );
    }
}
