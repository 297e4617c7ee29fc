//! A backend-local flag set while a closure runs and cleared however it ends (an ERROR
//! unwinds through here as a Rust panic: the guard's drop still runs).

use std::cell::Cell;
use std::thread::LocalKey;

/// Runs `f` with `flag` set; clears it after, on an error too.
pub fn while_set<R>(flag: &'static LocalKey<Cell<bool>>, f: impl FnOnce() -> R) -> R {
    struct Clear(&'static LocalKey<Cell<bool>>);
    impl Drop for Clear {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    flag.set(true);
    let _clear = Clear(flag);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static FLAG: Cell<bool> = const { Cell::new(false) };
    }

    #[test]
    fn set_inside_cleared_after_even_on_panic() {
        assert!(while_set(&FLAG, || FLAG.get()));
        assert!(!FLAG.get());
        let r = std::panic::catch_unwind(|| while_set(&FLAG, || panic!("an error")));
        assert!(r.is_err());
        assert!(!FLAG.get());
    }
}
