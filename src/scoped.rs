//! A backend-local flag set while a closure runs and put back however it ends (an ERROR
//! unwinds through here as a Rust panic: the guard's drop still runs).

use std::cell::Cell;
use std::thread::LocalKey;

/// Runs `f` with `flag` set; puts back what it was after (a nested call leaves it set for
/// the outer one), on an error too.
pub fn while_set<R>(flag: &'static LocalKey<Cell<bool>>, f: impl FnOnce() -> R) -> R {
    struct Restore(&'static LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(flag, flag.replace(true));
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
        assert!(
            while_set(&FLAG, || {
                while_set(&FLAG, || ());
                FLAG.get()
            }),
            "an inner call leaves it set for the outer one"
        );
        assert!(!FLAG.get());
        let r = std::panic::catch_unwind(|| while_set(&FLAG, || panic!("an error")));
        assert!(r.is_err());
        assert!(!FLAG.get());
    }
}
