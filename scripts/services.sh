#!/usr/bin/env bash
# Run the real back-end services on 127.0.0.1 without Docker:
#   Redis (Debian's redis-server), Apache Kafka 4.x (KRaft, one node acting as broker and
#   controller), Apache Cassandra 5.0 (standing in for ScyllaDB: same CQL protocol) and an
#   S3-compatible object store for media: SeaweedFS (Apache-2.0; MinIO is AGPL) as `weed mini`
#   (master + volume + filer + S3 gateway in one process), built from source with Go.
#
# Usage:
#   scripts/services.sh up            start whatever is not running yet, wait until all four answer
#   scripts/services.sh down          stop the four services (SIGTERM, then SIGKILL after a deadline)
#   scripts/services.sh down --wipe   ... and delete their data directories
#   scripts/services.sh status        print up/down for each one (exit 0 only if all four are up)
#   scripts/services.sh env           print `export CHAT_TEST_*=...` lines, for `eval "$(... env)"`
#   scripts/services.sh check         say what `up` would need and cannot get (Go, apt), download nothing
#
# Everything lives outside the clone, in ${CHAT_SERVICES_HOME:-$HOME/.cache/chat-services}:
#   kafka/      fetch/ (throwaway pom.xml, mvn.log), lib/ (jars + .fetched marker naming the
#               versions), conf/ (server.properties, log4j2.xml: rewritten on every start),
#               data/ (log.dirs), cluster-id, logs/ (server.log, stdout.log, *.prev), kafka.pid
#   cassandra/  fetch/, lib/, conf/ (cassandra.yaml, logback.xml), data/, logs/ (system.log,
#               stdout.log), tmp/ (java.io.tmpdir: JNA unpacks native code there), triggers/,
#               cassandra.pid
#   redis/      data/, logs/redis.log, redis.pid
#   seaweedfs/  weed (the binary), weed.version (marker naming the module version it was built
#               from), build/ (throwaway copy of the module source), build.log, conf/s3.json
#               (S3 identities: rewritten on every start), data/ (volumes, filer metadata,
#               buckets), logs/weed.log, weed.pid
# Kafka and Cassandra get one folder of jars each because their logging stacks conflict
# (Kafka: log4j2 behind SLF4J 1.7; Cassandra: logback behind SLF4J 2).
#
# Data is KEPT across `down`/`up` (Kafka storage is formatted once, S3 objects stay), which makes
# a restart quick and lets a developer look at what a test left behind. Set CHAT_SERVICES_FRESH=1
# to stop the services and wipe their data before starting (.ci/run does), or use `down --wipe`.
# Redis always runs without persistence (--save "" --appendonly no): it only holds rebuildable
# state. The SeaweedFS binary is kept by a wipe (only its data/ goes).
#
# Environment knobs (defaults in brackets):
#   CHAT_SERVICES_HOME [~/.cache/chat-services]   CHAT_SERVICES_FRESH [0]
#   CHAT_REDIS_PORT [6379]  CHAT_KAFKA_PORT [9092]  CHAT_KAFKA_CONTROLLER_PORT [9093]
#   CHAT_CASSANDRA_PORT [9042]  CHAT_CASSANDRA_STORAGE_PORT [7000]
#   CHAT_JAVA17_HOME [/usr/lib/jvm/java-17-openjdk-amd64]  (Cassandra 5.0 needs Java 17 exactly)
#   CHAT_CASSANDRA_HEAP [2g]
#   CHAT_S3_PORT [8333] (the S3 API; its gRPC port is 10000 above). SeaweedFS-internal HTTP ports,
#   each also with a gRPC port 10000 above (mini moves one on its own if it is taken):
#   CHAT_S3_MASTER_PORT [9333]  CHAT_S3_VOLUME_PORT [9340]  CHAT_S3_FILER_PORT [8888]
#   CHAT_S3_ADMIN_PORT [12535]
#   CHAT_GO [`go` on PATH, else /usr/local/go/bin/go, else /usr/lib/go/bin/go]  (builds SeaweedFS)
#   CHAT_KAFKA_TIMEOUT [180]  CHAT_CASSANDRA_TIMEOUT [300]  CHAT_REDIS_TIMEOUT [30]  (seconds)
#   CHAT_S3_TIMEOUT [60]
#   CHAT_SERVICES_ONLY ["redis kafka cassandra s3"]: the services `up`, `down` and `status` act on
#   (the fault tests run a private Kafka or Redis with their own CHAT_SERVICES_HOME and ports)
#
# Services started by `up` outlive this script (setsid + nohup) and never inherit the caller's
# stdout/stderr (they write to log files), so a CI job that captures our output does not hang.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Versions. Kafka's runtime has no SLF4J binding of its own; it uses slf4j-api 1.7.36 and brings
# log4j-core, so the binding is log4j-slf4j-impl (the SLF4J 1.x one) at the log4j-core version
# that this Kafka release depends on (4.3.1 -> 2.25.4). Without it the broker logs nothing.
KAFKA_VERSION=4.3.1
KAFKA_LOG4J_VERSION=2.25.4
CASSANDRA_VERSION=5.0.8
# Pinned so a new plugin release cannot change how the jars are fetched (Maven 3.8 would pick 2.8).
MVN_DEP_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
# SeaweedFS from the Go module proxy (its releases are not semver tags, hence a pseudo-version;
# this commit reports itself as 4.53). `go install ...@version` is refused because its go.mod
# has a replace directive, so the module is downloaded and built as the main module instead.
SEAWEEDFS_MODULE=github.com/seaweedfs/seaweedfs
SEAWEEDFS_VERSION=v0.0.0-20261109003541-7506e5f91cd6
# The test bucket and key pair (tests only; anonymous requests are refused).
S3_BUCKET=chat-media
S3_ACCESS_KEY=chat-test
S3_SECRET_KEY=chat-test-secret
S3_REGION=us-east-1

HOME_DIR="${CHAT_SERVICES_HOME:-$HOME/.cache/chat-services}"
REDIS_PORT="${CHAT_REDIS_PORT:-6379}"
KAFKA_PORT="${CHAT_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${CHAT_KAFKA_CONTROLLER_PORT:-9093}"
CASSANDRA_PORT="${CHAT_CASSANDRA_PORT:-9042}"
CASSANDRA_STORAGE_PORT="${CHAT_CASSANDRA_STORAGE_PORT:-7000}"
JAVA17_HOME="${CHAT_JAVA17_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}"
JAVA17="$JAVA17_HOME/bin/java"
KAFKA_TIMEOUT="${CHAT_KAFKA_TIMEOUT:-180}"
CASSANDRA_TIMEOUT="${CHAT_CASSANDRA_TIMEOUT:-300}"
REDIS_TIMEOUT="${CHAT_REDIS_TIMEOUT:-30}"
S3_PORT="${CHAT_S3_PORT:-8333}"
S3_MASTER_PORT="${CHAT_S3_MASTER_PORT:-9333}"
S3_VOLUME_PORT="${CHAT_S3_VOLUME_PORT:-9340}"
S3_FILER_PORT="${CHAT_S3_FILER_PORT:-8888}"
S3_ADMIN_PORT="${CHAT_S3_ADMIN_PORT:-12535}"
S3_TIMEOUT="${CHAT_S3_TIMEOUT:-60}"
STOP_TIMEOUT=60

KAFKA_DIR="$HOME_DIR/kafka"
CASSANDRA_DIR="$HOME_DIR/cassandra"
REDIS_DIR="$HOME_DIR/redis"
S3_DIR=$(realpath -m "$HOME_DIR/seaweedfs")   # absolute: the build and the server cd elsewhere

# Progress goes to stderr so that `env` output on stdout stays eval-able.
say() { printf '[services] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# Refuse a cache folder inside the clone: the scripts must never write into the repository.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
case "$(realpath -m "$HOME_DIR")/" in
  "$REPO_ROOT"/*) die "CHAT_SERVICES_HOME ($HOME_DIR) is inside the repository; choose a folder outside it" ;;
esac

# ---------------------------------------------------------------------------------------------
# Small helpers

# True if something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, no extra tools).
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Prints the pid from pid file $1 if that process is alive AND its command line contains $2.
# Checking the command line guards against a stale pid file whose number was reused.
live_pid() {
  local pidfile=$1 pattern=$2 pid
  [[ -f $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Read into a variable rather than piping into `grep -q` (with pipefail, an early-exiting
  # grep can make the pipeline fail).
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$pattern"* ]] || return 1
  printf '%s\n' "$pid"
}

# launch PIDFILE LOGFILE CMD...: start CMD detached from this script:
#  - setsid: own session/process group, so the caller's Ctrl-C or process-group kill misses it;
#  - nohup: ignore SIGHUP when the caller's terminal goes away;
#  - stdin from /dev/null, stdout+stderr to LOGFILE: nothing holds the caller's pipes open.
# The wrapper shell writes its own pid and then execs CMD, so the pid file holds CMD's pid.
launch() {
  local pidfile=$1 logfile=$2; shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # expanded by the inner shell, on purpose
  nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >"$logfile" 2>&1 </dev/null &
  local _
  for _ in $(seq 1 50); do
    [[ -s $pidfile ]] && return 0
    sleep 0.1
  done
  die "could not start $* (no pid file $pidfile)"
}

# Keep the previous run's log as *.prev (and drop its size-rolled parts *.1, *.2, ...) so that
# the readiness checks, which grep the log and its rolled parts, only see this run's lines.
rotate_log() {
  local f
  for f in "$@"; do
    rm -f "$f".[0-9]*
    if [[ -f $f ]]; then mv -f "$f" "$f.prev"; fi
  done
}

# log_says FILE PATTERN: PATTERN occurs in FILE or in its size-rolled parts FILE.1, FILE.2, ...
log_says() {
  local f=$1
  grep -qs -- "$2" "$f" "$f".[0-9]*
}

# wait_ready NAME PIDFILE PATTERN T0 DEADLINE LOG CHECK...: poll CHECK once a second until it
# succeeds, the process dies, or DEADLINE seconds after T0 (the $SECONDS of the launch) pass;
# times are printed from the launch, and on failure the tail of LOG is shown.
wait_ready() {
  local name=$1 pidfile=$2 pattern=$3 t0=$4 deadline=$5 logfile=$6; shift 6
  local last_note=$((SECONDS - t0))
  while true; do
    if "$@"; then
      say "$name is ready, $((SECONDS - t0)) s after launch"
      return 0
    fi
    if ! live_pid "$pidfile" "$pattern" >/dev/null; then
      say "$name exited during start-up; last lines of $logfile:"
      tail -n 60 "$logfile" >&2 || true
      return 1
    fi
    if (( SECONDS - t0 >= deadline )); then
      say "$name not ready $deadline s after launch; last lines of $logfile:"
      tail -n 60 "$logfile" >&2 || true
      return 1
    fi
    if (( SECONDS - t0 - last_note >= 15 )); then
      last_note=$((SECONDS - t0))
      say "  ... waiting for $name ($last_note s)"
    fi
    sleep 1
  done
}

# stop_service NAME PIDFILE PATTERN PORT: SIGTERM, wait up to STOP_TIMEOUT s, then SIGKILL.
# A process on PORT that this script did not start is left alone.
stop_service() {
  local name=$1 pidfile=$2 pattern=$3 port=$4 pid start
  if ! pid=$(live_pid "$pidfile" "$pattern"); then
    rm -f "$pidfile"
    if port_open "$port"; then
      say "$name: 127.0.0.1:$port is served by a process this script did not start; left alone"
    else
      say "$name: not running"
    fi
    return 0
  fi
  start=$SECONDS
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS - start >= STOP_TIMEOUT )); then
      say "$name (pid $pid) still running after $STOP_TIMEOUT s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.5
  done
  rm -f "$pidfile"
  say "$name stopped (pid $pid, $((SECONDS - start)) s)"
}

# Installs Debian packages; works with no stdin and no terminal (CI). Uses sudo when not root.
apt_install() {
  say "installing Debian packages: $*"
  local sudo=()
  if (( EUID != 0 )); then sudo=(sudo); fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "$@" </dev/null >&2
}

need_java17() {
  if [[ ! -x $JAVA17 ]]; then
    [[ $JAVA17_HOME == /usr/lib/jvm/java-17-openjdk-amd64 ]] ||
      die "no java at $JAVA17 (CHAT_JAVA17_HOME)"
    apt_install openjdk-17-jre-headless
  fi
  # Cassandra 5.0 calls System.setSecurityManager, which throws on Java 24+: insist on 17.
  local version
  version=$("$JAVA17" -version 2>&1) || die "$JAVA17 does not run"
  [[ $version == *'version "17'* ]] || die "$JAVA17 is not Java 17: $version"
}

# fetch_jars DIR MARKER GROUP:ARTIFACT:VERSION...: resolve the artifacts and all their runtime
# dependencies from Maven Central into DIR/lib with a throwaway pom (kept in DIR/fetch, never in
# the repo). Skipped when DIR/lib/.fetched already names MARKER (i.e. the same versions).
fetch_jars() {
  local dir=$1 marker=$2; shift 2
  if [[ -f $dir/lib/.fetched && "$(<"$dir/lib/.fetched")" == "$marker" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || apt_install maven
  say "fetching $marker into $dir/lib (Maven; first time only)"
  mkdir -p "$dir/fetch"
  local deps="" gav g a v
  for gav in "$@"; do
    IFS=: read -r g a v <<<"$gav"
    deps+="    <dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>
"
  done
  cat >"$dir/fetch/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/services.sh only to let Maven resolve the jars; not a project. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.chat-services</groupId>
  <artifactId>fetch</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
$deps  </dependencies>
</project>
EOF
  rm -rf "$dir/lib.tmp"
  local start=$SECONDS
  # Output goes to a file: resolving cassandra-all prints a harmless "[ERROR] ... \${jmc5.path}".
  if ! (cd "$dir/fetch" && mvn -B -q -f pom.xml "$MVN_DEP_PLUGIN:copy-dependencies" \
        -DincludeScope=runtime -DoutputDirectory="$dir/lib.tmp") >"$dir/fetch/mvn.log" 2>&1 </dev/null; then
    say "Maven failed; last lines of $dir/fetch/mvn.log:"
    tail -n 40 "$dir/fetch/mvn.log" >&2
    exit 1
  fi
  # Swap in the new folder only once it is complete, then mark it.
  rm -rf "${dir:?}/lib"
  mv "$dir/lib.tmp" "$dir/lib"
  printf '%s' "$marker" >"$dir/lib/.fetched"
  say "fetched $(find "$dir/lib" -name '*.jar' | wc -l) jars in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------------------------------------
# Redis

REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/logs/redis.log"

redis_ping() {
  if command -v redis-cli >/dev/null; then
    [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
  else
    port_open "$REDIS_PORT"
  fi
}

redis_start() {
  if ! command -v redis-server >/dev/null; then
    apt_install redis-server
  fi
  if live_pid "$REDIS_PID" redis-server >/dev/null && redis_ping; then
    say "redis already running on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  if port_open "$REDIS_PORT"; then
    say "WARNING: port $REDIS_PORT is taken by a process this script did not start; using it as Redis"
    return 0
  fi
  mkdir -p "$REDIS_DIR/data" "$REDIS_DIR/logs"
  rotate_log "$REDIS_LOG"
  local t0=$SECONDS
  # Tests only: no RDB snapshots, no AOF. --logfile "" logs to stdout, i.e. to REDIS_LOG.
  launch "$REDIS_PID" "$REDIS_LOG" redis-server \
    --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$REDIS_DIR/data" --daemonize no --logfile ""
  wait_ready redis "$REDIS_PID" redis-server "$t0" "$REDIS_TIMEOUT" "$REDIS_LOG" redis_ping
}

# ---------------------------------------------------------------------------------------------
# Kafka (KRaft, single node)

KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/logs/server.log"   # written by log4j2
KAFKA_OUT="$KAFKA_DIR/logs/stdout.log"   # the JVM's own stdout/stderr

kafka_write_config() {
  mkdir -p "$KAFKA_DIR/conf" "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
  # Static voters => the storage is formatted without --standalone.
  cat >"$KAFKA_DIR/conf/server.properties" <<EOF
# Generated by scripts/services.sh on every 'up'; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/data
# One node: every internal topic has replication factor 1.
offsets.topic.replication.factor=1
# One partition for __consumer_offsets makes the first consumer-group join much faster.
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests start consumers and expect them to get partitions at once.
group.initial.rebalance.delay.ms=0
# Small machine (2 cores, 512 MiB heap).
num.network.threads=2
num.io.threads=2
log.cleaner.dedupe.buffer.size=33554432
EOF
  cat >"$KAFKA_DIR/conf/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/services.sh. XML because log4j-core reads it without extra jars. -->
<Configuration status="warn" name="chat-kafka">
  <Appenders>
    <RollingFile name="server" fileName="${sys:kafka.logs.dir}/server.log"
                 filePattern="${sys:kafka.logs.dir}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.authorizer.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
  </Loggers>
</Configuration>
EOF
}

# JVM arguments for the broker and for its StorageTool (same jars, same logging config).
KAFKA_JVM=(
  -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  # A broker that ran out of heap is better dead (the readiness check / tests notice) than limping.
  -XX:+ExitOnOutOfMemoryError
  -Dlog4j2.configurationFile="$KAFKA_DIR/conf/log4j2.xml"
  -Dkafka.logs.dir="$KAFKA_DIR/logs"
  -cp "$KAFKA_DIR/lib/*"
)
kafka_java() { "$JAVA17" "${KAFKA_JVM[@]}" "$@"; }

kafka_format() {
  # Formatting writes meta.properties (cluster id, node id) plus the bootstrap metadata; once
  # present, the storage is kept, so there is nothing to do (and no JVM start to pay for).
  [[ -f $KAFKA_DIR/data/meta.properties ]] && return 0
  local cluster_id start=$SECONDS
  if [[ -s $KAFKA_DIR/cluster-id ]]; then
    cluster_id=$(<"$KAFKA_DIR/cluster-id")
  else
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null </dev/null | tail -n 1)
    [[ $cluster_id =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: could not generate a cluster id (got '$cluster_id')"
    printf '%s' "$cluster_id" >"$KAFKA_DIR/cluster-id"
  fi
  say "kafka: formatting storage (cluster id $cluster_id)"
  kafka_java kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$KAFKA_DIR/conf/server.properties" --ignore-formatted \
    >"$KAFKA_DIR/logs/format.log" 2>&1 </dev/null ||
    { tail -n 40 "$KAFKA_DIR/logs/format.log" >&2; die "kafka: storage format failed"; }
  say "kafka: formatted in $((SECONDS - start)) s"
}

kafka_ready() {
  log_says "$KAFKA_LOG" 'Kafka Server started' && port_open "$KAFKA_PORT"
}

# Sets KAFKA_STARTED=1 when the broker must be waited for, and KAFKA_T0 to its launch time.
KAFKA_STARTED=0
KAFKA_T0=$SECONDS
kafka_launch() {
  local pid
  if pid=$(live_pid "$KAFKA_PID" kafka.Kafka); then
    if kafka_ready; then
      say "kafka already running on 127.0.0.1:$KAFKA_PORT"
    else
      # Probably still starting (or started with other ports: then run 'down' first).
      say "kafka (pid $pid) is running but not ready on 127.0.0.1:$KAFKA_PORT yet; waiting for it"
      KAFKA_STARTED=1
      KAFKA_T0=$SECONDS
    fi
    return 0
  fi
  if port_open "$KAFKA_PORT"; then
    say "WARNING: port $KAFKA_PORT is taken by a process this script did not start; using it as Kafka"
    return 0
  fi
  kafka_write_config
  kafka_format
  rotate_log "$KAFKA_LOG" "$KAFKA_OUT"
  KAFKA_T0=$SECONDS
  launch "$KAFKA_PID" "$KAFKA_OUT" "$JAVA17" "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_DIR/conf/server.properties"
  KAFKA_STARTED=1
  say "kafka: launched (pid $(<"$KAFKA_PID")), log $KAFKA_LOG"
}

# ---------------------------------------------------------------------------------------------
# Cassandra 5.0 (single node, test settings)

CASSANDRA_PID="$CASSANDRA_DIR/cassandra.pid"
CASSANDRA_LOG="$CASSANDRA_DIR/logs/system.log"   # written by logback
CASSANDRA_OUT="$CASSANDRA_DIR/logs/stdout.log"   # the JVM's own stdout/stderr

cassandra_write_config() {
  local d=$CASSANDRA_DIR
  mkdir -p "$d/conf" "$d/data" "$d/logs" "$d/tmp" "$d/triggers"
  # cassandra.yaml is parsed strictly: an unknown key stops the node. 5.0 key names only.
  cat >"$d/conf/cassandra.yaml" <<EOF
# Generated by scripts/services.sh on every 'up'; edit the script, not this file.
# A single test node: one token, no snapshots on drop/truncate, everything on 127.0.0.1.
cluster_name: chat-test
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$CASSANDRA_STORAGE_PORT"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $CASSANDRA_STORAGE_PORT
native_transport_port: $CASSANDRA_PORT
start_native_transport: true
commitlog_sync: periodic
commitlog_sync_period: 10s
data_file_directories:
  - $d/data/data
commitlog_directory: $d/data/commitlog
saved_caches_directory: $d/data/saved_caches
hints_directory: $d/data/hints
cdc_raw_directory: $d/data/cdc_raw
auto_snapshot: false
# The projection writes a user's stream rows of one slice as one single-partition batch (up to
# 40 KiB): not a misuse to warn about.
batch_size_warn_threshold: 50KiB
EOF
  cat >"$d/conf/logback.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/services.sh. cassandra-all ships no logback config: without one it
     logs DEBUG to the console. Here: INFO to a file, nothing on the console. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>${cassandra.logdir}/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>${cassandra.logdir}/system.log.%i</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>50MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
  <logger name="com.datastax" level="WARN"/>
  <logger name="io.netty" level="WARN"/>
</configuration>
EOF
}

cassandra_ready() {
  log_says "$CASSANDRA_LOG" 'Startup complete' && port_open "$CASSANDRA_PORT"
}

CASSANDRA_STARTED=0
CASSANDRA_T0=$SECONDS
cassandra_launch() {
  local pid
  if pid=$(live_pid "$CASSANDRA_PID" CassandraDaemon); then
    if cassandra_ready; then
      say "cassandra already running on 127.0.0.1:$CASSANDRA_PORT"
    else
      # Probably still starting (or started with other ports: then run 'down' first).
      say "cassandra (pid $pid) is running but not ready on 127.0.0.1:$CASSANDRA_PORT yet; waiting for it"
      CASSANDRA_STARTED=1
      CASSANDRA_T0=$SECONDS
    fi
    return 0
  fi
  if port_open "$CASSANDRA_PORT"; then
    say "WARNING: port $CASSANDRA_PORT is taken by a process this script did not start; using it as Cassandra"
    return 0
  fi
  cassandra_write_config
  local d=$CASSANDRA_DIR jamm
  local jamms=("$d"/lib/jamm-*.jar)
  jamm=${jamms[0]}
  [[ -f $jamm ]] || die "cassandra: no jamm jar in $d/lib"
  # JNA unpacks native code into java.io.tmpdir; a noexec /tmp would break it, hence our own.
  local mount_opts=""
  if command -v findmnt >/dev/null; then
    mount_opts=$(findmnt -n -o OPTIONS -T "$d/tmp" 2>/dev/null || true)
  fi
  if [[ ,$mount_opts, == *,noexec,* ]]; then
    say "WARNING: $d/tmp is on a noexec mount; JNA may fail (set CHAT_SERVICES_HOME elsewhere)"
  fi
  rotate_log "$CASSANDRA_LOG" "$CASSANDRA_OUT"
  local jvm=(
    # 2 GiB: every table costs heap (memtable, metadata), and a test run creates a keyspace of
    # 16 tables per scenario; 1 GiB ran out after a few hundred tables.
    -Xms${CHAT_CASSANDRA_HEAP:-2g} -Xmx${CHAT_CASSANDRA_HEAP:-2g} -Xss256k -XX:+UseG1GC -XX:+ParallelRefProcEnabled
    # Cassandra's start-up checks ask for this: a node that hit OOM may corrupt data if it goes on.
    -XX:+ExitOnOutOfMemoryError
    -Djava.net.preferIPv4Stack=true -Djava.awt.headless=true
    -Djava.io.tmpdir="$d/tmp" -Djna.tmpdir="$d/tmp"
    # Cassandra's own settings: config must be a URL; foreground keeps stdout/stderr open
    # (we redirect them to a file anyway).
    -Dcassandra.config="file://$d/conf/cassandra.yaml"
    -Dcassandra-foreground=yes
    -Dcassandra.storagedir="$d/data"
    -Dcassandra.logdir="$d/logs"
    # An (empty) triggers folder of our own, else a WARN every minute.
    -Dcassandra.triggers_dir="$d/triggers"
    -Dlogback.configurationFile="$d/conf/logback.xml"
    -Dchronicle.analytics.disable=true
    # Faster single-node start (test only).
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.superuser_setup_delay_ms=0
    -Dcassandra.unsafesystem=true
    # jamm measures object sizes for memtables; it must be loaded as an agent.
    -javaagent:"$jamm"
    # The module flags of Cassandra 5.0's conf/jvm17-server.options.
    -Djdk.attach.allowAttachSelf=true
    -Dio.netty.tryReflectionSetAccessible=true
  )
  local m
  for m in java.base/jdk.internal.misc java.management.rmi/com.sun.jmx.remote.internal.rmi \
           java.management/com.sun.jmx.remote.security java.rmi/sun.rmi.registry \
           java.rmi/sun.rmi.server java.sql/java.sql java.base/java.lang.ref \
           jdk.unsupported/sun.misc; do
    jvm+=(--add-exports "$m=ALL-UNNAMED")
  done
  for m in java.base/java.lang.module java.base/jdk.internal.loader java.base/jdk.internal.ref \
           java.base/jdk.internal.reflect java.base/jdk.internal.math java.base/jdk.internal.module \
           java.base/jdk.internal.util.jar jdk.management/com.sun.management.internal \
           java.base/sun.nio.ch java.base/java.io java.base/java.lang.reflect java.base/java.lang \
           java.base/java.util java.base/java.nio; do
    jvm+=(--add-opens "$m=ALL-UNNAMED")
  done
  CASSANDRA_T0=$SECONDS
  launch "$CASSANDRA_PID" "$CASSANDRA_OUT" \
    "$JAVA17" "${jvm[@]}" -cp "$d/lib/*" org.apache.cassandra.service.CassandraDaemon
  CASSANDRA_STARTED=1
  say "cassandra: launched (pid $(<"$CASSANDRA_PID")), log $CASSANDRA_LOG"
}

# ---------------------------------------------------------------------------------------------
# S3: SeaweedFS `weed mini` (master, volume server, filer and S3 gateway in one process)

S3_BIN="$S3_DIR/weed"
S3_MARKER="$S3_DIR/weed.version"
S3_PID="$S3_DIR/weed.pid"
S3_LOG="$S3_DIR/logs/weed.log"          # everything (-logtostderr): no glog files in /tmp
S3_PATTERN="mini -dir=$S3_DIR/data"     # how live_pid recognises our server

# Prints the go command to use, or fails.
find_go() {
  if [[ -n ${CHAT_GO:-} ]]; then
    [[ -x $CHAT_GO ]] || return 1
    printf '%s\n' "$CHAT_GO"
    return 0
  fi
  local g
  for g in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
    if [[ -n $g && -x $g ]]; then
      printf '%s\n' "$g"
      return 0
    fi
  done
  return 1
}

# Builds $S3_BIN from the pinned module unless the marker says it already was. The module cache
# is read-only, hence the writable copy. It is always made at the same path (build/src): without
# -trimpath the Go build cache keys SeaweedFS's own packages by their folder, so a fixed folder
# lets a rebuild reuse them.
s3_build() {
  local want="$SEAWEEDFS_MODULE@$SEAWEEDFS_VERSION"
  if [[ -x $S3_BIN && -f $S3_MARKER && "$(<"$S3_MARKER")" == "$want" ]]; then
    return 0
  fi
  local go
  go=$(find_go) || die "SeaweedFS (the S3 store) is built from source with Go, and no go command was found (PATH, /usr/local/go/bin, /usr/lib/go/bin); install Go >= 1.26 or set CHAT_GO"
  local log="$S3_DIR/build.log" out="$S3_BIN.tmp" start=$SECONDS
  mkdir -p "$S3_DIR"
  say "building SeaweedFS $want with $("$go" version) into $S3_BIN (first time only: about 5 min on 2 cores; log $log)"
  rm -f "$S3_MARKER" "$out"
  if [[ -d $S3_DIR/build ]]; then
    chmod -R u+w "$S3_DIR/build"
    rm -rf "$S3_DIR/build"
  fi
  mkdir -p "$S3_DIR/build"
  # In a subshell: cd + exports stay local. GOWORK=off: no go.work from a parent folder applies.
  if ! (
      set -euo pipefail
      cd "$S3_DIR/build"
      export GOWORK=off GO111MODULE=on
      json=$("$go" mod download -json "$want")
      dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
      if [[ -z $dir || ! -f $dir/go.mod ]]; then
        echo "go mod download did not name a module directory:"
        echo "$json"
        exit 1
      fi
      echo "module source: $dir"
      cp -r "$dir" src
      chmod -R u+w src
      cd src
      # -s -w: no symbol table / DWARF (about a third smaller); stack traces still work.
      "$go" build -ldflags "-s -w" -o "$out" ./weed
    ) >"$log" 2>&1 </dev/null; then
    say "SeaweedFS build failed; last lines of $log:"
    tail -n 40 "$log" >&2
    exit 1
  fi
  mv -f "$out" "$S3_BIN"
  printf '%s' "$want" >"$S3_MARKER"
  rm -rf "$S3_DIR/build"
  local v
  v=$("$S3_BIN" version 2>/dev/null || true)
  say "built SeaweedFS (${v%%$'\n'*}) in $((SECONDS - start)) s"
}

# HTTP status of a GET (ListObjects) on the test bucket; extra curl arguments add the signature.
s3_code() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" \
    "http://127.0.0.1:$S3_PORT/$S3_BUCKET" 2>/dev/null || true
}

# Ready = the bucket exists and answers a signed request, and an anonymous one is refused.
s3_ready() {
  [[ "$(s3_code --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY")" == 200 ]] &&
    [[ "$(s3_code)" == 403 ]]
}

S3_STARTED=0
S3_T0=$SECONDS
s3_launch() {
  local pid
  if pid=$(live_pid "$S3_PID" "$S3_PATTERN"); then
    if s3_ready; then
      say "s3 already running on 127.0.0.1:$S3_PORT"
    else
      say "s3 (pid $pid) is running but not ready on 127.0.0.1:$S3_PORT yet; waiting for it"
      S3_STARTED=1
      S3_T0=$SECONDS
    fi
    return 0
  fi
  if port_open "$S3_PORT"; then
    say "WARNING: port $S3_PORT is taken by a process this script did not start; using it as S3"
    return 0
  fi
  mkdir -p "$S3_DIR/conf" "$S3_DIR/data" "$S3_DIR/logs"
  # Static identities. Naming a config file turns authentication on: a request without a valid
  # signature (anonymous included) is refused. "Admin" lets tests create their own buckets.
  (umask 077 && cat >"$S3_DIR/conf/s3.json" <<EOF
{
  "identities": [
    {
      "name": "$S3_ACCESS_KEY",
      "credentials": [{ "accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY" }],
      "actions": ["Admin", "Read", "Write", "List", "Tagging"]
    }
  ]
}
EOF
  )
  rotate_log "$S3_LOG"
  # The server must not pick up settings from the caller: AWS_ACCESS_KEY_ID/SECRET would add an
  # admin identity (maybe a developer's real keys), S3_* pre-create buckets, WEED_* override
  # config. It runs in its own folder, so no stray ./security.toml or ./filer.toml is read.
  local clean=(-u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN
               -u S3_BUCKET -u S3_TABLE_BUCKET -u S3_EXTERNAL_URL) v
  for v in $(compgen -e); do
    if [[ $v == WEED_* ]]; then clean+=(-u "$v"); fi
  done
  S3_T0=$SECONDS
  # Every listener on 127.0.0.1 (-ip.bind; -ip is the address the parts give each other). Not
  # needed here, so off: WebDAV, Iceberg/Lance catalogs, the admin UI (its HTTP port still
  # answers, with 404), the legacy admin port, and telemetry to seaweedfs.com.
  launch "$S3_PID" "$S3_LOG" env -C "$S3_DIR" "${clean[@]}" \
    "$S3_BIN" -logtostderr mini -dir="$S3_DIR/data" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$S3_PORT" -master.port="$S3_MASTER_PORT" -volume.port="$S3_VOLUME_PORT" \
    -filer.port="$S3_FILER_PORT" -admin.port="$S3_ADMIN_PORT" \
    -s3.config="$S3_DIR/conf/s3.json" -bucket="$S3_BUCKET" \
    -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -admin.ui=false -admin.port.legacy=0 -master.telemetry=false
  S3_STARTED=1
  say "s3: launched SeaweedFS (pid $(<"$S3_PID")), log $S3_LOG"
}

# ---------------------------------------------------------------------------------------------
# Commands

ONLY=" ${CHAT_SERVICES_ONLY:-redis kafka cassandra s3} "
want() { [[ $ONLY == *" $1 "* ]]; }

cmd_up() {
  local total=$SECONDS
  if [[ ${CHAT_SERVICES_FRESH:-0} == 1 ]]; then
    say "CHAT_SERVICES_FRESH=1: stopping and wiping data first"
    cmd_down --wipe
  fi
  if want kafka || want cassandra; then need_java17; fi
  if want kafka; then
    fetch_jars "$KAFKA_DIR" "kafka_2.13 $KAFKA_VERSION log4j-slf4j-impl $KAFKA_LOG4J_VERSION" \
      "org.apache.kafka:kafka_2.13:$KAFKA_VERSION" \
      "org.apache.logging.log4j:log4j-slf4j-impl:$KAFKA_LOG4J_VERSION"
  fi
  if want cassandra; then
    fetch_jars "$CASSANDRA_DIR" "cassandra-all $CASSANDRA_VERSION" \
      "org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION"
  fi
  if want s3; then
    command -v curl >/dev/null || apt_install curl ca-certificates   # the S3 readiness check
    s3_build
  fi

  if want redis; then redis_start; fi

  # Cassandra is by far the slowest: launch it first, and let Kafka's format + start overlap.
  if want cassandra; then cassandra_launch; fi
  if want kafka; then kafka_launch; fi
  if want s3; then s3_launch; fi
  local ok=1
  if (( S3_STARTED )); then
    if ! wait_ready s3 "$S3_PID" "$S3_PATTERN" "$S3_T0" "$S3_TIMEOUT" "$S3_LOG" s3_ready; then
      ok=0
      say "s3: a signed request got $(s3_code --aws-sigv4 "aws:amz:$S3_REGION:s3" \
        --user "$S3_ACCESS_KEY:$S3_SECRET_KEY") (want 200), an anonymous one $(s3_code) (want 403)"
    fi
  fi
  if (( KAFKA_STARTED )); then
    wait_ready kafka "$KAFKA_PID" kafka.Kafka "$KAFKA_T0" "$KAFKA_TIMEOUT" "$KAFKA_LOG" kafka_ready || ok=0
  fi
  if (( CASSANDRA_STARTED )); then
    wait_ready cassandra "$CASSANDRA_PID" CassandraDaemon "$CASSANDRA_T0" "$CASSANDRA_TIMEOUT" \
      "$CASSANDRA_LOG" cassandra_ready || ok=0
  fi
  (( ok )) || die "some services did not start (logs under $HOME_DIR)"
  say "all services up ($((SECONDS - total)) s in total)"
}

# Checks, before anything is downloaded or built, that what `up` needs can be had: Debian
# packages it would install (and a way to install them: apt-get, as root or with sudo), and Go
# >= 1.26 unless SeaweedFS is built already. One line per problem; exit status 1 if any.
cmd_check() {
  local problems=() apt=()
  if want kafka || want cassandra; then
    [[ -x $JAVA17 ]] || apt+=(openjdk-17-jre-headless)
    if ! command -v mvn >/dev/null && { [[ ! -f $KAFKA_DIR/lib/.fetched ]] || [[ ! -f $CASSANDRA_DIR/lib/.fetched ]]; }; then
      apt+=(maven)
    fi
  fi
  if want redis; then command -v redis-server >/dev/null || apt+=(redis-server); fi
  if want s3; then command -v curl >/dev/null || apt+=(curl); fi
  if ((${#apt[@]})); then
    if ! command -v apt-get >/dev/null; then
      problems+=("needs ${apt[*]}: install them (this script installs them only with apt-get, on Debian or Ubuntu)")
    elif ((EUID != 0)) && ! sudo -n true 2>/dev/null; then
      problems+=("needs ${apt[*]}: run as root or with password-less sudo so that apt-get can install them, or install them first")
    fi
  fi
  if want s3 && ! [[ -x $S3_BIN && -f $S3_MARKER && "$(<"$S3_MARKER")" == "$SEAWEEDFS_MODULE@$SEAWEEDFS_VERSION" ]]; then
    local go version
    if ! go=$(find_go); then
      problems+=("needs Go >= 1.26 once, to build SeaweedFS (the S3 store of the tests; 4 to 17 min the first time): install it from https://go.dev/dl/ (tar -C /usr/local -xzf go1.26.*.linux-amd64.tar.gz; it is found in /usr/local/go/bin) or set CHAT_GO")
    else
      version=$("$go" env GOVERSION 2>/dev/null || true)
      if ! printf '%s\n' "$version" | grep -Eq '^go(1\.(2[6-9]|[3-9][0-9])|[2-9])'; then
        problems+=("needs Go >= 1.26 to build SeaweedFS; $go is ${version:-unknown}: install a newer one from https://go.dev/dl/ or set CHAT_GO")
      fi
    fi
  fi
  local p
  for p in "${problems[@]}"; do say "ERROR: $p"; done
  ((${#problems[@]} == 0))
}

cmd_down() {
  local wipe=0
  case "${1:-}" in
    "") ;;
    --wipe) wipe=1 ;;
    *) die "usage: $0 down [--wipe]" ;;
  esac
  # In parallel: Cassandra's drain on SIGTERM takes several seconds, no need to queue behind it.
  if want kafka; then stop_service kafka "$KAFKA_PID" kafka.Kafka "$KAFKA_PORT" & fi
  if want cassandra; then stop_service cassandra "$CASSANDRA_PID" CassandraDaemon "$CASSANDRA_PORT" & fi
  if want redis; then stop_service redis "$REDIS_PID" redis-server "$REDIS_PORT" & fi
  if want s3; then stop_service s3 "$S3_PID" "$S3_PATTERN" "$S3_PORT" & fi
  wait
  if (( wipe )); then
    say "wiping data: $KAFKA_DIR/data $CASSANDRA_DIR/data $REDIS_DIR/data $S3_DIR/data"
    rm -rf "$KAFKA_DIR/data" "$KAFKA_DIR/cluster-id" "$CASSANDRA_DIR/data" "$REDIS_DIR/data" \
      "$S3_DIR/data"
  fi
}

status_line() {
  local name=$1 pidfile=$2 pattern=$3 port=$4 pid
  if pid=$(live_pid "$pidfile" "$pattern"); then
    if port_open "$port"; then
      echo "$name: up (pid $pid, 127.0.0.1:$port)"
      return 0
    fi
    echo "$name: starting (pid $pid, 127.0.0.1:$port not answering yet)"
    return 1
  fi
  if port_open "$port"; then
    echo "$name: up (127.0.0.1:$port, not started by this script)"
    return 0
  fi
  echo "$name: down"
  return 1
}

cmd_status() {
  local rc=0
  if want redis; then status_line redis "$REDIS_PID" redis-server "$REDIS_PORT" || rc=1; fi
  if want kafka; then status_line kafka "$KAFKA_PID" kafka.Kafka "$KAFKA_PORT" || rc=1; fi
  if want cassandra; then status_line cassandra "$CASSANDRA_PID" CassandraDaemon "$CASSANDRA_PORT" || rc=1; fi
  if want s3; then status_line s3 "$S3_PID" "$S3_PATTERN" "$S3_PORT" || rc=1; fi
  return $rc
}

cmd_env() {
  echo "export CHAT_TEST_KAFKA=127.0.0.1:$KAFKA_PORT"
  echo "export CHAT_TEST_CASSANDRA=127.0.0.1:$CASSANDRA_PORT"
  echo "export CHAT_TEST_REDIS=redis://127.0.0.1:$REDIS_PORT/"
  echo "export CHAT_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
  echo "export CHAT_TEST_S3_BUCKET=$S3_BUCKET"
  echo "export CHAT_TEST_S3_ACCESS_KEY=$S3_ACCESS_KEY"
  echo "export CHAT_TEST_S3_SECRET_KEY=$S3_SECRET_KEY"
  echo "export CHAT_TEST_S3_REGION=$S3_REGION"
}

case "${1:-}" in
  up) cmd_up ;;
  down) shift; cmd_down "$@" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  check) cmd_check ;;
  *) echo "usage: $0 up|down [--wipe]|status|env|check" >&2; exit 2 ;;
esac
