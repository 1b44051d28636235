#!/usr/bin/env bash
# Smoke-tests the built image the way a batch system runs it: every step is a fresh container
# running as the image's non-root user (uid 10001), with /data, /cache and /out mounted from host
# directories, no network, and one CPU thread per container.
#
#   scripts/test-image.sh [IMAGE]        (default stillroom:latest; build it with scripts/build-image.sh)
#
# Steps: (1) pack the digits set and save a random-init teacher; (2) phase 1 as an AWS Batch array
# of two containers running at the same time on one cache; (3) cache-status and verify-cache;
# (4) train-student, then --resume in a new container; (5) a phase-1 container killed mid-run on a
# fresh cache, the array re-run, and the cache compared file by file with step 2's. Prints one
# summary line; exits non-zero naming the failing step. KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=test-image
# shellcheck source-path=SCRIPTDIR/..
source scripts/container-common.sh

# --- What the containers run: adapt here when the CLI changes (long flags only). ---------------
IMAGE=${1:-${IMAGE:-stillroom:latest}}
IMAGE_UID=10001
TRAIN_SHARDS='/data/train-*.tar'
VAL_SHARDS='/data/val-*.tar'
TEACHER=regnetx_002
TEACHER_CKPT=/cache/teachers/$TEACHER.pth
CLEAN_CACHE=/cache/digits-$TEACHER.zarr  # step 2 (an uninterrupted array)
KILLED_CACHE=/cache/digits-killed.zarr    # step 5 (one job killed, then the array re-run)
ARRAY_SIZE=2
UNITS_PER_JOB=10     # 8 views in blocks of 2 = 4 blocks, x 5 shards = 20 units, over 2 jobs
QUIET=(--progress off) # only the summary lines in these logs (phase 1 and 2)
PACK=(pack digits /data --per-shard 300 --val-fraction 0.2)
SAVE_TEACHER="import timm, torch; torch.manual_seed(0); \
torch.save(timm.create_model('$TEACHER', num_classes=10).state_dict(), '$TEACHER_CKPT')"
phase1() { # phase1 CACHE: the phase-1 command line (same settings in steps 2 and 5: byte-identical caches)
  PHASE1=(cache-teacher --shards "$TRAIN_SHARDS" --out "$1" --teacher "$TEACHER" --teacher-checkpoint "$TEACHER_CKPT"
    --recipe deit --img-size 32 --views 8 --view-block 2 --topk 5 --batch-size 64 --workers 0 "${QUIET[@]}")
}
STATUS=(cache-status "$CLEAN_CACHE")
VERIFY=(verify-cache "$CLEAN_CACHE" --shards "$TRAIN_SHARDS" --teacher-checkpoint "$TEACHER_CKPT" --samples 32)
TRAIN=(train-student --config configs/tiny_cpu.yaml --model deit_tiny_distilled_patch16_224
  --shards "$TRAIN_SHARDS" --val-shards "$VAL_SHARDS" --cache "$CLEAN_CACHE" --out /out/student
  --workers 0 "${QUIET[@]}")
TRAIN_EPOCHS=1
RESUME_EPOCHS=2
# ---------------------------------------------------------------------------------------------

WORK=""
STEP=setup
STARTED=() # containers this script started, removed on exit
TIMES=()   # "name seconds" per step

fail() {
  REPORTED=1
  say "FAILED at step '$STEP': $*"
  say "logs and files are in $WORK"
  exit 1
}

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ] && [ "$REPORTED" = 0 ]; then
    say "FAILED at step '$STEP': a command exited with status $rc${WORK:+ (logs and files are in $WORK)}"
  fi
  local ctr
  for ctr in "${STARTED[@]}"; do # one by one: a name already gone must not stop the others
    "${ENGINE_CMD[@]}" rm -f -v "$ctr" >/dev/null 2>&1 || true
  done
  if [ $rc -eq 0 ] && [ -n "$WORK" ] && [ "${KEEP:-0}" != 1 ]; then
    rm -rf "$WORK" 2>/dev/null || say "could not remove $WORK (files owned by uid $IMAGE_UID)"
  fi
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Host directories for the three volumes, writable by the image's user.
make_dirs() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/stillroom-image-test.XXXXXX")
  mkdir -p "$WORK/data" "$WORK/cache/teachers" "$WORK/out" "$WORK/logs"
  if is_root; then
    chown -R "$IMAGE_UID:$IMAGE_UID" "$WORK/data" "$WORK/cache" "$WORK/out"
  else
    chmod -R a+rwx "$WORK/data" "$WORK/cache" "$WORK/out"
  fi
}

# container_opts NAME: sets CTR_OPTS, the flags of every test container (no --user: the image's own).
container_opts() {
  CTR_OPTS=(--name "$1" --network none "${RUN_OPTS[@]}" -e OMP_NUM_THREADS=1
    -v "$WORK/data:/data" -v "$WORK/cache:/cache" -v "$WORK/out:/out")
}

# run_one NAME [run flags...] -- ARGS...: one container in the foreground; output in logs/NAME.log.
run_one() {
  local name=$1 flags=()
  shift
  while [ "$1" != -- ]; do flags+=("$1") && shift; done
  shift
  container_opts "stillroom-test-$$-$name"
  STARTED+=("stillroom-test-$$-$name")
  "${ENGINE_CMD[@]}" run --rm "${CTR_OPTS[@]}" "${flags[@]}" "$IMAGE" "$@" >"$WORK/logs/$name.log" 2>&1 ||
    fail "container '$name' exited with status $? (logs/$name.log: $(tail -n 2 "$WORK/logs/$name.log" | tr '\n' ' '))"
}

# start_array NAME: the phase-1 array, ARRAY_SIZE detached containers with AWS Batch's variables.
start_array() {
  local name=$1 i
  for ((i = 0; i < ARRAY_SIZE; i++)); do
    container_opts "stillroom-test-$$-$name-$i"
    STARTED+=("stillroom-test-$$-$name-$i")
    "${ENGINE_CMD[@]}" run -d "${CTR_OPTS[@]}" -e "AWS_BATCH_JOB_ARRAY_INDEX=$i" -e "AWS_BATCH_JOB_ARRAY_SIZE=$ARRAY_SIZE" \
      "$IMAGE" "${PHASE1[@]}" >/dev/null || fail "could not start array job $i"
  done
}

# wait_job NAME EXPECTED_STATUS: waits for one container, saves its log, checks its exit status.
wait_job() {
  local ctr=stillroom-test-$$-$1 status
  status=$("${ENGINE_CMD[@]}" wait "$ctr" | tail -n 1)
  "${ENGINE_CMD[@]}" logs "$ctr" >"$WORK/logs/$1.log" 2>&1 || true
  [ "$status" = "$2" ] || fail "container '$1' exited with status $status, expected $2 (logs/$1.log)"
}

# The first log lines of array job I must say what it found: job I/N (AWS Batch array job) ...
check_job_line() {
  local log=$WORK/logs/$1.log line
  line=$(head -n 3 "$log" | grep -o "job $2/$ARRAY_SIZE (AWS Batch array job): .*" || true)
  [ -n "$line" ] || fail "logs/$1.log does not start with 'job $2/$ARRAY_SIZE (AWS Batch array job): ...'"
  echo "$line"
}

# Both containers of an array ran at the same time (each started before the other finished).
check_overlap() {
  local a b
  a=$("${ENGINE_CMD[@]}" inspect --format '{{.State.StartedAt}}|{{.State.FinishedAt}}' "stillroom-test-$$-$1-0")
  b=$("${ENGINE_CMD[@]}" inspect --format '{{.State.StartedAt}}|{{.State.FinishedAt}}' "stillroom-test-$$-$1-1")
  [[ ${a%|*} < ${b#*|} && ${b%|*} < ${a#*|} ]] || fail "the two array jobs did not run at the same time ($a / $b)"
}

preflight() {
  fix_quirks "$IMAGE"
  local uid
  uid=$("${ENGINE_CMD[@]}" run --rm --network none "${RUN_OPTS[@]}" --entrypoint id "$IMAGE" -u)
  [ "$uid" = "$IMAGE_UID" ] || fail "the image runs as uid $uid, not the non-root uid $IMAGE_UID"
  say "image $IMAGE runs as uid $uid; work directory $WORK"
}

step_pack() {
  STEP=pack
  run_one pack -- "${PACK[@]}"
  grep -q '^train: .* samples' "$WORK/logs/pack.log" || fail "pack printed no 'train: N samples' line"
  [ -s "$WORK/data/train.json" ] || fail "no train.json sidecar in /data"
  run_one teacher --entrypoint python -- -c "$SAVE_TEACHER"
  [ -s "$WORK${TEACHER_CKPT}" ] || fail "no teacher checkpoint at $TEACHER_CKPT"
  say "pack: $(grep -h -E '^(train|val):' "$WORK/logs/pack.log" | tr '\n' ' ')+ teacher $TEACHER_CKPT"
}

step_phase1_array() {
  STEP="phase1 array"
  phase1 "$CLEAN_CACHE"
  start_array phase1
  wait_job phase1-0 0
  wait_job phase1-1 0
  check_overlap phase1
  local i line markers
  for ((i = 0; i < ARRAY_SIZE; i++)); do
    line=$(check_job_line "phase1-$i" "$i")
    say "phase1 job $i: $line"
    grep -q "^cache-teacher: $UNITS_PER_JOB units done" "$WORK/logs/phase1-$i.log" ||
      fail "job $i did not report '$UNITS_PER_JOB units done' (logs/phase1-$i.log)"
  done
  markers=$(count_markers "$CLEAN_CACHE")
  [ "$markers" = $((UNITS_PER_JOB * ARRAY_SIZE)) ] ||
    fail "$markers completion markers in $CLEAN_CACHE, expected $((UNITS_PER_JOB * ARRAY_SIZE))"
}

step_status_verify() {
  STEP="status+verify"
  run_one status -- "${STATUS[@]}"
  local done_total
  done_total=$(grep -o -E '"units_(done|total)": [0-9]+' "$WORK/logs/status.log" | grep -o -E '[0-9]+$' | tr '\n' /)
  [ "$done_total" = "$((UNITS_PER_JOB * ARRAY_SIZE))/$((UNITS_PER_JOB * ARRAY_SIZE))/" ] ||
    fail "cache-status: units done/total ${done_total%/}, expected all $((UNITS_PER_JOB * ARRAY_SIZE))"
  run_one verify -- "${VERIFY[@]}"
  grep -q '"ok": true' "$WORK/logs/verify.log" || fail "verify-cache did not report ok (logs/verify.log)"
  say "cache-status: units done/total ${done_total%/}; verify-cache: ok"
}

step_train() {
  STEP=train
  run_one train -- "${TRAIN[@]}" --epochs "$TRAIN_EPOCHS"
  local out=$WORK/out/student
  [ -s "$out/last.pth" ] || fail "no /out/student/last.pth"
  [ -s "$out/metrics.jsonl" ] || fail "no /out/student/metrics.jsonl"
  grep -q '"final"' "$WORK/logs/train.log" || fail "train-student printed no final metrics"
}

step_resume() {
  STEP=resume
  local out=$WORK/out/student starts
  run_one resume -- "${TRAIN[@]}" --epochs "$RESUME_EPOCHS" --resume --allow-change epochs
  grep -q "resumed from /out/student/last.pth: epoch $TRAIN_EPOCHS" "$WORK/logs/resume.log" ||
    fail "the new container did not resume from epoch $TRAIN_EPOCHS (logs/resume.log)"
  starts=$(grep -c '"event": "start"' "$out/metrics.jsonl" || true)
  [ "$starts" = 2 ] || fail "metrics.jsonl holds $starts start events, expected 2 (one per container)"
  say "train-student: $TRAIN_EPOCHS epoch, then resumed to $RESUME_EPOCHS in a new container;" \
    "last.pth, metrics.jsonl ($(wc -l <"$out/metrics.jsonl") events); $(grep -o '"top1_[a-z]*": [0-9.]*' \
      "$WORK/logs/resume.log" | tr '\n' ' ')"
}

# count_markers CACHE: units with a completion marker (chunks of the cache's done array) on disk.
count_markers() {
  { find "$WORK$1/done" -type f ! -name zarr.json 2>/dev/null || true; } | wc -l
}

# Waits until at least N units of CACHE are done or job 0 exits.
wait_for_units() {
  local n=0 deadline=$((SECONDS + 600))
  while [ $SECONDS -lt $deadline ]; do
    n=$(count_markers "$1")
    [ "$n" -ge "$2" ] && return 0
    [ "$("${ENGINE_CMD[@]}" inspect --format '{{.State.Running}}' "stillroom-test-$$-killed-0")" = true ] ||
      fail "job 0 finished before it could be killed ($n units done): nothing was interrupted"
    sleep 0.1
  done
  fail "no $2 units done after 10 minutes"
}

step_kill_rerun() {
  STEP=kill+rerun
  phase1 "$KILLED_CACHE"
  start_array killed
  wait_for_units "$KILLED_CACHE" 2
  "${ENGINE_CMD[@]}" kill --signal KILL "stillroom-test-$$-killed-0" >/dev/null
  wait_job killed-0 137
  wait_job killed-1 0
  start_array rerun
  wait_job rerun-0 0
  wait_job rerun-1 0
  local line already
  line=$(check_job_line rerun-0 0)
  already=$(sed -n 's/.* \([0-9]*\) already done.*/\1/p' <<<"$line")
  [[ $already =~ ^[0-9]+$ && $already -lt $UNITS_PER_JOB ]] ||
    fail "the re-run job 0 found '$already' of $UNITS_PER_JOB units done: the kill interrupted nothing"
  say "killed job 0 had finished $already of its $UNITS_PER_JOB units; re-run: $line"
  compare_caches
}

# Every file of the killed-and-rerun cache equals the clean run's, and no file is missing or extra.
compare_caches() {
  local a=$WORK$CLEAN_CACHE b=$WORK$KILLED_CACHE files
  diff -r -q "$a" "$b" >"$WORK/logs/compare.log" 2>&1 ||
    fail "the re-run cache differs from the clean run's: $(head -n 3 "$WORK/logs/compare.log" | tr '\n' ' ')"
  files=$(find "$a" -type f | wc -l)
  COMPARED="byte-identical, $files files"
}

timed() { # timed LABEL FUNCTION...: runs the functions, records the label's wall time
  local label=$1 t0
  shift
  t0=$(now)
  local f
  for f in "$@"; do "$f"; done
  TIMES+=("$label $(since "$t0")s")
}

main() {
  local t0
  t0=$(now)
  trap cleanup EXIT
  pick_engine find
  image_exists "$IMAGE" || die "image $IMAGE not found: build it with scripts/build-image.sh"
  make_dirs
  preflight
  timed pack+teacher step_pack
  timed "phase1 array" step_phase1_array
  timed status+verify step_status_verify
  timed train step_train
  timed resume step_resume
  timed kill+rerun step_kill_rerun
  printf '%s: OK %s | %s | %s | %s + %s | %s (%s) | total %ss\n' "$PREFIX" "${TIMES[@]}" "$COMPARED" "$(since "$t0")"
}

main "$@"
