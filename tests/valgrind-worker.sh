#!/bin/sh
# The worker under valgrind memcheck, for `make valgrind` (the harness runs
# whatever BW_BINARY names).  An error makes the worker exit 99, so the test
# that ran it fails; tests/valgrind-check.sh then reads every process's log
# and fails the run on any error or definitely lost block, including those of
# workers whose test only looked at the database.
#
#   BW_REAL_BINARY    the worker (build/billing-worker)
#   BW_VALGRIND_LOGS  where each process writes vg.PID.log
set -eu
exec valgrind --tool=memcheck --error-exitcode=99 --leak-check=full \
	--show-leak-kinds=definite --errors-for-leak-kinds=definite \
	--track-fds=no --num-callers=30 \
	--log-file="${BW_VALGRIND_LOGS:?}/vg.%p.log" \
	"${BW_REAL_BINARY:?}" "$@"
