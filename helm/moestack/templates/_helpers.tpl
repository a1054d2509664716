{{/* Chart-scoped helpers of the moestack chart. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "moestack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: fullnameOverride, or <release>-<chart> (just <release> when it contains the
chart name). Truncated to 40 characters: KubeRay derives longer names (RayCluster, Services,
pods) from the RayService name. */}}
{{- define "moestack.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* chart label value. */}}
{{- define "moestack.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's objects. */}}
{{- define "moestack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moestack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels of every object. */}}
{{- define "moestack.labels" -}}
helm.sh/chart: {{ include "moestack.chart" . }}
{{ include "moestack.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moestack
{{- end -}}

{{/* Image reference. */}}
{{- define "moestack.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "moestack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moestack.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether the bundled PostgreSQL runs: on, unless an external database is given. */}}
{{- define "moestack.bundledPostgres" -}}
{{- if and .Values.database.postgresql.enabled (not (or .Values.database.url .Values.database.existingSecret)) -}}true{{- end -}}
{{- end -}}

{{/* Name of the Secret with the database URL and its key; empty when none is used. */}}
{{- define "moestack.databaseSecretName" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else if or .Values.database.url (include "moestack.bundledPostgres" .) -}}
{{- printf "%s-database" (include "moestack.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "moestack.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}{{ .Values.database.secretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* Name of the Secret with the admin key; empty when the admin API stays off. */}}
{{- define "moestack.adminSecretName" -}}
{{- if .Values.adminKey.existingSecret -}}
{{- .Values.adminKey.existingSecret -}}
{{- else if or .Values.adminKey.value .Values.adminKey.generate -}}
{{- printf "%s-admin" (include "moestack.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "moestack.adminSecretKey" -}}
{{- if .Values.adminKey.existingSecret -}}{{ .Values.adminKey.secretKey }}{{- else -}}admin-key{{- end -}}
{{- end -}}

{{/* Environment variable that carries the database URL into the moestack config. */}}
{{- define "moestack.databaseUrlEnv" -}}MOESTACK_DATABASE_URL{{- end -}}

{{/* The moestack configuration the pods run: .Values.moestack with what the chart decides. */}}
{{- define "moestack.config" -}}
{{- $cfg := deepCopy .Values.moestack -}}
{{- $gateway := default (dict) $cfg.gateway -}}
{{- $_ := set $gateway "host" "0.0.0.0" -}}
{{- $_ := set $gateway "operator_host" "0.0.0.0" -}}
{{- $_ := set $cfg "gateway" $gateway -}}
{{- $tenancy := default (dict) $cfg.tenancy -}}
{{- if not (hasKey $tenancy "enabled") -}}
{{- $_ := set $tenancy "enabled" true -}}
{{- end -}}
{{- $_ := set $cfg "tenancy" $tenancy -}}
{{- if include "moestack.databaseSecretName" . -}}
{{- $storage := default (dict) $cfg.storage -}}
{{- $_ := set $storage "url_env" (include "moestack.databaseUrlEnv" .) -}}
{{- $_ := set $cfg "storage" $storage -}}
{{- end -}}
{{- if not $cfg.cache_dir -}}
{{- $_ := set $cfg "cache_dir" (printf "%s/.moestack-cache" .Values.modelCache.mountPath) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The Ray Serve config (RayService serveConfigV2). */}}
{{- define "moestack.serveConfig" -}}
{{- $port := 8000 -}}
{{- with .Values.moestack.gateway }}{{ with .port }}{{ $port = . }}{{ end }}{{ end -}}
{{- /* Gateway replicas (and so the app build task, which follows their label selector) run
only on the head pod, the one pod holding the admin key and the database URL. */ -}}
{{- $gatewayOptions := dict "num_cpus" 0 "label_selector" (dict (include "moestack.gatewayNodeLabel" .) "true") -}}
{{- $deployments := list (dict "name" "Gateway" "ray_actor_options" $gatewayOptions) -}}
{{- $app := dict "name" "moestack" "route_prefix" "/" "import_path" "moestack.serve.app:app_builder" "args" (dict "config_yaml" (include "moestack.config" .)) "deployments" $deployments -}}
{{- $serve := dict "proxy_location" .Values.serve.proxyLocation "http_options" (dict "host" "0.0.0.0" "port" (int $port)) "applications" (list $app) -}}
{{- toYaml $serve -}}
{{- end -}}

{{/* Gateway port (moestack.gateway.port). */}}
{{- define "moestack.gatewayPort" -}}
{{- $port := 8000 -}}
{{- with .Values.moestack.gateway }}{{ with .port }}{{ $port = . }}{{ end }}{{ end -}}
{{- int $port -}}
{{- end -}}

{{/* Ray node label of the head pod, which the Gateway deployment selects. */}}
{{- define "moestack.gatewayNodeLabel" -}}moestack.io/gateway{{- end -}}

{{/* First operator port (moestack.gateway.operator_port: admin API and /metrics). */}}
{{- define "moestack.operatorPort" -}}
{{- $port := 8001 -}}
{{- with .Values.moestack.gateway }}{{ with .operator_port }}{{ $port = . }}{{ end }}{{ end -}}
{{- int $port -}}
{{- end -}}

{{/* Operator ports on the head pod: one per gateway replica (operator_port_count, default
num_replicas), as the replicas bind the first free one. */}}
{{- define "moestack.operatorPortCount" -}}
{{- $gw := default (dict) .Values.moestack.gateway -}}
{{- int (default (default 1 $gw.num_replicas) $gw.operator_port_count) -}}
{{- end -}}

{{/* Environment of the head container (where the gateways run): the secrets the moestack
config refers to. Worker pods run only engines and get none. */}}
{{- define "moestack.secretEnv" -}}
{{- with include "moestack.databaseSecretName" . }}
- name: {{ include "moestack.databaseUrlEnv" $ }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "moestack.databaseSecretKey" $ }}
{{- end }}
{{- with include "moestack.adminSecretName" . }}
- name: {{ dig "tenancy" "admin_key_env" "MOESTACK_ADMIN_KEY" $.Values.moestack }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "moestack.adminSecretKey" $ }}
{{- end }}
{{- end -}}

{{/* Environment of every Ray pod: Ray Serve's throughput profile unless
moestack.ray.serve_throughput_optimized is false (moestack.serve.local.THROUGHPUT_ENV). */}}
{{- define "moestack.serveEnv" -}}
{{- if dig "ray" "serve_throughput_optimized" true .Values.moestack }}
- {name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, value: "0"}
- {name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP, value: "0"}
- {name: RAY_SERVE_USE_GRPC_BY_DEFAULT, value: "1"}
- {name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE, value: "1000"}
- {name: RAY_SERVE_FREEZE_GC_ON_STARTUP, value: "1"}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: config, shared memory, model cache. Arg: dict root, shmSize. */}}
{{- define "moestack.volumes" -}}
{{- $root := .root -}}
- name: moestack-config
  configMap:
    name: {{ include "moestack.fullname" $root }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: model-cache
{{- with $root.Values.modelCache }}
{{- if .existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .existingClaim }}
    readOnly: {{ .readOnly }}
{{- else if .create }}
  persistentVolumeClaim:
    claimName: {{ include "moestack.fullname" $root }}-model-cache
    readOnly: {{ .readOnly }}
{{- else if .hostPath }}
  hostPath:
    path: {{ .hostPath }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end -}}

{{- define "moestack.volumeMounts" -}}
- name: moestack-config
  mountPath: /etc/moestack
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
  readOnly: {{ .Values.modelCache.readOnly }}
{{- end -}}

{{/* `ray start` parameters as sorted "key: "value"" lines (KubeRay wants strings). */}}
{{- define "moestack.rayStartParams" -}}
{{- $lines := list -}}
{{- range $k, $v := . }}{{ $lines = append $lines (printf "%s: %s" $k ($v | toString | quote)) }}{{ end -}}
{{- join "\n" $lines -}}
{{- end -}}
