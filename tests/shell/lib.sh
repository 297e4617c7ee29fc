# TAP helpers for the multi-session tests. Each *.t sources this file; prove runs them
# against the cluster scripts/test.sh started (PGHOST/PGPORT/PGUSER set, database keypal_test).
set -euo pipefail
export PGDATABASE=${PGDATABASE:-keypal_test}
TAP_N=0
TAP_FAILED=0

q() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }

ok() {   # ok CONDITION-EXIT-CODE DESCRIPTION  (use: ok "$( [ a = b ]; echo $? )" "desc")
    TAP_N=$((TAP_N + 1))
    if [ "$1" = 0 ]; then echo "ok $TAP_N - $2"; else echo "not ok $TAP_N - $2"; TAP_FAILED=$((TAP_FAILED + 1)); fi
}

is() {   # is GOT WANT DESCRIPTION
    TAP_N=$((TAP_N + 1))
    if [ "$1" = "$2" ]; then
        echo "ok $TAP_N - $3"
    else
        echo "not ok $TAP_N - $3"
        echo "#   got:  '$1'"
        echo "#   want: '$2'"
        TAP_FAILED=$((TAP_FAILED + 1))
    fi
}

done_testing() {
    echo "1..$TAP_N"
    [ "$TAP_FAILED" = 0 ]
}
