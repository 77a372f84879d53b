//! Services between modules: one module hands a typed, named handle to others.
//!
//! A provider declares a [`ServiceKey`] in its own crate (a `const`) and calls
//! [`crate::module::Context::provide`] in `start`; a consumer calls
//! [`crate::module::Context::service`] in its own `start`. Modules start in the order of the
//! app's module list, so a provider must be listed before its consumers. A consumer's crate may
//! depend on the provider's crate only for the key and the service's types.
//!
//! Every way a lookup can fail names both modules: the provider not compiled in, compiled in
//! but not enabled, listed after the consumer, or started without providing the service.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};

/// The name and type of a service: `provider.name`, handing out `Arc<T>`.
pub struct ServiceKey<T: ?Sized + 'static> {
    /// The module that provides it.
    pub provider: &'static str,
    /// The service's name within that module.
    pub name: &'static str,
    _type: PhantomData<fn() -> Arc<T>>,
}

impl<T: ?Sized + 'static> ServiceKey<T> {
    pub const fn new(provider: &'static str, name: &'static str) -> Self {
        Self {
            provider,
            name,
            _type: PhantomData,
        }
    }
}

impl<T: ?Sized> Clone for ServiceKey<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for ServiceKey<T> {}

impl<T: ?Sized> fmt::Display for ServiceKey<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.provider, self.name)
    }
}

/// Why a service could not be provided or found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    #[error(
        "module `{consumer}` needs service `{service}` of module `{provider}`, which is not compiled into this binary (build with the cargo feature `{provider}`)"
    )]
    NotCompiled {
        consumer: String,
        service: String,
        provider: String,
    },
    #[error(
        "module `{consumer}` needs service `{service}` of module `{provider}`, which is compiled in but not enabled (add `{provider}` to modules.enabled)"
    )]
    NotEnabled {
        consumer: String,
        service: String,
        provider: String,
    },
    #[error(
        "module `{consumer}` needs service `{service}` of module `{provider}`, which starts after it (list `{provider}` before `{consumer}` in app/src/modules.rs)"
    )]
    NotStartedYet {
        consumer: String,
        service: String,
        provider: String,
    },
    #[error(
        "module `{consumer}` needs service `{service}`, but module `{provider}` started without providing it"
    )]
    NotProvided {
        consumer: String,
        service: String,
        provider: String,
    },
    #[error(
        "module `{consumer}` asked for service `{service}` with a type other than the one module `{provider}` provided"
    )]
    WrongType {
        consumer: String,
        service: String,
        provider: String,
    },
    #[error(
        "module `{module}` cannot provide `{service}`: a module provides only services named after itself"
    )]
    NotOwner { module: String, service: String },
    #[error("service `{service}` is provided twice")]
    Duplicate { service: String },
}

/// The registry, shared by every module of one process; filled in start order.
#[derive(Clone, Default)]
pub struct Services {
    compiled: Arc<[&'static str]>,
    enabled: Arc<[&'static str]>,
    state: Arc<RwLock<Registry>>,
}

#[derive(Default)]
struct Registry {
    /// `(provider, name)` → an `Arc<T>` behind `Any`.
    handles: HashMap<(&'static str, &'static str), Box<dyn Any + Send + Sync>>,
    /// Modules whose `start` has returned.
    started: Vec<&'static str>,
}

impl Services {
    /// A registry for a process whose binary has `compiled` modules, of which it runs
    /// `enabled`.
    pub fn new(compiled: Vec<&'static str>, enabled: Vec<&'static str>) -> Self {
        Self {
            compiled: compiled.into(),
            enabled: enabled.into(),
            state: Arc::default(),
        }
    }

    /// Register `value` under `key`. Only the module named in the key may provide it.
    pub fn provide<T: ?Sized + Send + Sync + 'static>(
        &self,
        module: &str,
        key: ServiceKey<T>,
        value: Arc<T>,
    ) -> Result<(), ServiceError> {
        if key.provider != module {
            return Err(ServiceError::NotOwner {
                module: module.to_owned(),
                service: key.to_string(),
            });
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.handles.contains_key(&(key.provider, key.name)) {
            return Err(ServiceError::Duplicate {
                service: key.to_string(),
            });
        }
        state
            .handles
            .insert((key.provider, key.name), Box::new(value));
        Ok(())
    }

    /// The service under `key`, asked for by module `consumer`.
    pub fn get<T: ?Sized + Send + Sync + 'static>(
        &self,
        consumer: &str,
        key: ServiceKey<T>,
    ) -> Result<Arc<T>, ServiceError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let found = state.handles.get(&(key.provider, key.name));
        if let Some(value) = found.and_then(|h| h.downcast_ref::<Arc<T>>()) {
            return Ok(value.clone());
        }
        // Only a failed lookup pays for the names in its message.
        let (c, s, p) = (
            consumer.to_owned(),
            key.to_string(),
            key.provider.to_owned(),
        );
        if found.is_some() {
            return Err(ServiceError::WrongType {
                consumer: c,
                service: s,
                provider: p,
            });
        }
        Err(if !self.compiled.contains(&key.provider) {
            ServiceError::NotCompiled {
                consumer: c,
                service: s,
                provider: p,
            }
        } else if !self.enabled.contains(&key.provider) {
            ServiceError::NotEnabled {
                consumer: c,
                service: s,
                provider: p,
            }
        } else if !state.started.contains(&key.provider) {
            ServiceError::NotStartedYet {
                consumer: c,
                service: s,
                provider: p,
            }
        } else {
            ServiceError::NotProvided {
                consumer: c,
                service: s,
                provider: p,
            }
        })
    }

    /// Record that `module`'s `start` returned (what it has not provided by then, it never
    /// will).
    pub fn mark_started(&self, module: &'static str) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.started.push(module);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Greeter: Send + Sync {
        fn greet(&self) -> String;
    }
    struct Hello;
    impl Greeter for Hello {
        fn greet(&self) -> String {
            "hello".into()
        }
    }
    const GREETER: ServiceKey<dyn Greeter> = ServiceKey::new("a", "greeter");

    #[test]
    fn a_provided_service_is_found_with_its_type() {
        let s = Services::new(vec!["a", "b"], vec!["a", "b"]);
        s.provide("a", GREETER, Arc::new(Hello)).expect("provide");
        s.mark_started("a");
        assert_eq!(s.get("b", GREETER).expect("found").greet(), "hello");
        let other: ServiceKey<String> = ServiceKey::new("a", "greeter");
        assert!(matches!(
            s.get("b", other),
            Err(ServiceError::WrongType { .. })
        ));
        assert!(matches!(
            s.provide("a", GREETER, Arc::new(Hello)),
            Err(ServiceError::Duplicate { .. })
        ));
        assert!(matches!(
            s.provide("b", GREETER, Arc::new(Hello)),
            Err(ServiceError::NotOwner { .. })
        ));
    }

    #[test]
    fn each_missing_case_names_both_modules() {
        let cases = [
            (Services::new(vec!["b"], vec!["b"]), "not compiled"),
            (Services::new(vec!["a", "b"], vec!["b"]), "not enabled"),
            (
                Services::new(vec!["b", "a"], vec!["b", "a"]),
                "starts after",
            ),
        ];
        for (s, says) in cases {
            let err = s.get("b", GREETER).err().expect("missing").to_string();
            assert!(err.contains("`b`") && err.contains("`a`"), "{err}");
            assert!(err.contains(says), "{err}");
        }
        let s = Services::new(vec!["a", "b"], vec!["a", "b"]);
        s.mark_started("a");
        let err = s.get("b", GREETER).err().expect("missing").to_string();
        assert!(err.contains("without providing"), "{err}");
    }
}
