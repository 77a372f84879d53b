{{/* Names and labels. */}}
{{- define "bulwark.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bulwark.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "bulwark.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bulwark.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bulwark.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bulwark.labels" -}}
helm.sh/chart: {{ include "bulwark.chart" . }}
{{ include "bulwark.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bulwark
{{- end }}

{{/* Selector labels of one role: (dict "root" $ "role" "web"). */}}
{{- define "bulwark.roleSelectorLabels" -}}
{{ include "bulwark.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "bulwark.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bulwark.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bulwark.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
A Bulwark duration ("250ms", "5s", "2m", "1h") in whole seconds, rounded up.
The schema restricts drain durations to one number and one unit.
*/}}
{{- define "bulwark.durationSeconds" -}}
{{- $d := toString . }}
{{- if hasSuffix "ms" $d }}
{{- div (add (trimSuffix "ms" $d | atoi) 999) 1000 }}
{{- else if hasSuffix "s" $d }}
{{- trimSuffix "s" $d | atoi }}
{{- else if hasSuffix "m" $d }}
{{- mul (trimSuffix "m" $d | atoi) 60 }}
{{- else if hasSuffix "h" $d }}
{{- mul (trimSuffix "h" $d | atoi) 3600 }}
{{- else }}
{{- fail (printf "cannot read duration %q (expected e.g. 500ms, 5s, 2m, 1h)" $d) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds = preStop sleep + drain.grace + drain.timeout + margin.
drain.grace and drain.timeout are the same values that render the config's [drain] section.
*/}}
{{- define "bulwark.terminationGracePeriodSeconds" -}}
{{- $l := .Values.lifecycle }}
{{- $grace := include "bulwark.durationSeconds" .Values.config.drain.grace | atoi }}
{{- $timeout := include "bulwark.durationSeconds" .Values.config.drain.timeout | atoi }}
{{- add (int $l.preStopSleepSeconds) $grace $timeout (int $l.terminationGraceMarginSeconds) }}
{{- end }}

{{/* A TOML value: JSON strings, numbers, booleans and arrays are valid TOML. */}}
{{- define "bulwark.tomlValue" -}}
{{- toJson . }}
{{- end }}

{{/* Bulwark's config file (TOML). Secrets are never rendered here. */}}
{{- define "bulwark.configToml" -}}
{{- $c := .Values.config -}}
# Rendered by the Helm chart {{ include "bulwark.chart" . }} from values `config.*`.
# Secrets come from the environment (BULWARK__DATABASE__URL, ...), never from this file.
mode = {{ $c.mode | toJson }}
data_dir = "/var/lib/bulwark"

[server]
listen = {{ printf "0.0.0.0:%d" (int .Values.ports.http) | toJson }}
metrics_listen = {{ printf "0.0.0.0:%d" (int .Values.ports.metrics) | toJson }}
body_limit_bytes = {{ int64 $c.server.body_limit_bytes }}
request_timeout = {{ $c.server.request_timeout | toJson }}
cors_allowed_origins = {{ $c.server.cors_allowed_origins | toJson }}
compression = {{ $c.server.compression | toJson }}

[telemetry]
log_format = {{ $c.telemetry.log_format | toJson }}
log_level = {{ $c.telemetry.log_level | toJson }}
{{- with $c.telemetry.otlp_endpoint }}
otlp_endpoint = {{ . | toJson }}
{{- end }}
service_name = {{ $c.telemetry.service_name | toJson }}
trace_sample_ratio = {{ printf "%.6f" (float64 $c.telemetry.trace_sample_ratio) }}

[database]
max_connections = {{ int64 $c.database.max_connections }}
min_connections = {{ int64 $c.database.min_connections }}
connect_timeout = {{ $c.database.connect_timeout | toJson }}
acquire_timeout = {{ $c.database.acquire_timeout | toJson }}
idle_timeout = {{ $c.database.idle_timeout | toJson }}
migrate_on_start = {{ not .Values.migrations.enabled | toJson }}

[bus]
prefix = {{ $c.bus.prefix | toJson }}
duplicate_window = {{ $c.bus.duplicate_window | toJson }}
request_timeout = {{ $c.bus.request_timeout | toJson }}

[redis]
key_prefix = {{ $c.redis.key_prefix | toJson }}
command_timeout = {{ $c.redis.command_timeout | toJson }}

[auth]
{{- with $c.auth.jwks_url }}
jwks_url = {{ . | toJson }}
{{- end }}
jwks_refresh = {{ $c.auth.jwks_refresh | toJson }}
issuer = {{ $c.auth.issuer | toJson }}
audience = {{ $c.auth.audience | toJson }}
role_claim = {{ $c.auth.role_claim | toJson }}
leeway = {{ $c.auth.leeway | toJson }}

[drain]
grace = {{ $c.drain.grace | toJson }}
timeout = {{ $c.drain.timeout | toJson }}

[modules]
enabled = {{ $c.modules.enabled | toJson }}
{{- /* annotation.settings (when annotation.enabled), pipeline.* (when pipeline.enabled) and
reporting.settings (when reporting.enabled) are more module sections, rendered alike. */}}
{{- $sections := deepCopy $c.moduleSettings }}
{{- if .Values.annotation.enabled }}
{{- $_ := set $sections "annotation" (merge (dict "export_dir" .Values.annotation.exports.mountPath) (deepCopy .Values.annotation.settings)) }}
{{- end }}
{{- if .Values.pipeline.enabled }}
{{- $p := .Values.pipeline }}
{{- /* parallelism: every worker slot of the deployment (with the HPA, its maximum), so the
       scheduler queues only what workers can start at once. */}}
{{- $workers := ternary .Values.worker.autoscaling.maxReplicas .Values.worker.replicaCount .Values.worker.autoscaling.enabled }}
{{- $pipeline := dict "dags_folder" $p.dags.mountPath "reload_interval" $p.reloadInterval "worker_slots" (int64 $p.workerSlots) "parallelism" (mul (int64 $p.workerSlots) (int64 $workers)) }}
{{- /* [pipeline.engine] as dotted keys of [pipeline]. */}}
{{- $_ := set $pipeline "engine.kind" $p.engine.kind }}
{{- $_ := set $pipeline "engine.memory_limit_mb" (int64 $p.engine.memoryLimitMb) }}
{{- if eq $p.engine.kind "ballista" }}
{{- if not $p.engine.schedulerUrl }}
{{- fail "pipeline.engine.schedulerUrl: needed when pipeline.engine.kind is ballista (df://host:port)" }}
{{- end }}
{{- $_ := set $pipeline "engine.scheduler_url" $p.engine.schedulerUrl }}
{{- end }}
{{- $_ := set $sections "pipeline" $pipeline }}
{{- end }}
{{- /* reporting.settings (when reporting.enabled) is one more; its tables and reports follow the
       sections below. The source and replica URLs are secrets: env only (bulwark.env). */}}
{{- $r := .Values.reporting }}
{{- if .Values.secrets.reportingSourceUrl.key }}
{{- if not $r.enabled }}
{{- fail "secrets.reportingSourceUrl: needs reporting.enabled (the [reporting] section with reporting.tables)" }}
{{- end }}
{{- if not $r.tables }}
{{- fail "reporting.tables: needed when secrets.reportingSourceUrl.key is set (Bulwark refuses a source_url with no captured table)" }}
{{- end }}
{{- end }}
{{- if $r.enabled }}
{{- $_ := set $sections "reporting" (deepCopy $r.settings) }}
{{- end }}
{{- range $section, $keys := $sections }}

[{{ $section }}]
{{- range $k, $v := $keys }}
{{ $k }} = {{ include "bulwark.tomlValue" $v }}
{{- end }}
{{- end }}
{{- if $r.enabled }}
{{- range $t := $r.tables }}

[[reporting.tables]]
{{- range $k, $v := $t }}
{{ $k }} = {{ include "bulwark.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $name, $report := $r.reports }}

[reporting.reports.{{ $name }}]
{{- range $k, $v := $report }}
{{- if ne $k "metrics" }}
{{ $k }} = {{ include "bulwark.tomlValue" $v }}
{{- end }}
{{- end }}
{{- with $report.metrics }}

[reporting.reports.{{ $name }}.metrics]
{{- range $m, $expr := . }}
{{ $m }} = {{ include "bulwark.tomlValue" $expr }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- with $c.extraToml }}

# config.extraToml: nested module tables ([cache.namespaces.NAME], [cache.queries.NAME], ...)
{{ . }}
{{- end }}
{{ end }}

{{/* One secret-backed env var: (dict "root" $ "env" "BULWARK__X__Y" "ref" .Values.secrets.x). */}}
{{- define "bulwark.secretEnv" -}}
{{- if .ref.key }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ default (default (include "bulwark.fullname" .root) .root.Values.secrets.existingSecret) .ref.name }}
      key: {{ .ref.key }}
{{- end }}
{{- end }}

{{/* Environment of every Bulwark container (Deployments and the migration Job). */}}
{{- define "bulwark.env" -}}
{{- $s := .Values.secrets }}
{{- if eq .Values.config.mode "production" }}
{{- if not $s.databaseUrl.key }}{{ fail "config.mode production needs secrets.databaseUrl.key (PostgreSQL URL)" }}{{ end }}
{{- if not $s.busUrl.key }}{{ fail "config.mode production needs secrets.busUrl.key (NATS URL)" }}{{ end }}
{{- if not $s.redisUrl.key }}{{ fail "config.mode production needs secrets.redisUrl.key (Redis URL)" }}{{ end }}
{{- if and (not .Values.config.auth.jwks_url) (not $s.jwtSecret.key) }}{{ fail "config.mode production needs config.auth.jwks_url or secrets.jwtSecret.key" }}{{ end }}
{{- end }}
- name: BULWARK_CONFIG
  value: /etc/bulwark/bulwark.toml
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__DATABASE__URL" "ref" $s.databaseUrl) }}
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__DATABASE__READ_URL" "ref" $s.databaseReadUrl) }}
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__BUS__URL" "ref" $s.busUrl) }}
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__REDIS__URL" "ref" $s.redisUrl) }}
{{- if not .Values.config.auth.jwks_url }}
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__AUTH__HS256_SECRET" "ref" $s.jwtSecret) }}
{{- end }}
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__REPORTING__SOURCE_URL" "ref" $s.reportingSourceUrl) }}
{{- include "bulwark.secretEnv" (dict "root" . "env" "BULWARK__REPORTING__REPLICA_URL" "ref" $s.reportingReplicaUrl) }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "bulwark.configChecksum" -}}
{{- include "bulwark.configToml" . | sha256sum }}
{{- end }}

{{/*
The pipeline DAG folder's volume source (pipeline.enabled): a claim, a ConfigMap named by the
user, the chart's <release>-dags ConfigMap (pipeline.dags.files), or an empty folder. At most one
of the three may be set.
*/}}
{{- define "bulwark.pipelineDagsVolume" -}}
{{- $d := .Values.pipeline.dags }}
{{- $n := 0 }}
{{- if $d.existingClaim }}{{ $n = add1 $n }}{{ end }}
{{- if $d.configMap }}{{ $n = add1 $n }}{{ end }}
{{- if $d.files }}{{ $n = add1 $n }}{{ end }}
{{- if gt $n 1 }}
{{- fail "pipeline.dags: set at most one of existingClaim, configMap and files" }}
{{- end }}
{{- if $d.existingClaim }}
persistentVolumeClaim:
  claimName: {{ $d.existingClaim }}
  readOnly: true
{{- else if $d.configMap }}
configMap:
  name: {{ $d.configMap }}
{{- else if $d.files }}
configMap:
  name: {{ include "bulwark.fullname" . }}-dags
{{- else }}
emptyDir: {}
{{- end }}
{{- end }}
