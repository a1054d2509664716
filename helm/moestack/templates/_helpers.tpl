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

{{/* Whether moestack has a database: external (existingSecret or url) or bundled. */}}
{{- define "moestack.hasDatabase" -}}
{{- if or .Values.database.existingSecret .Values.database.url (include "moestack.bundledPostgres" .) -}}true{{- end -}}
{{- end -}}

{{/* Name of the Secret with the external database's URL and its key; empty when none. */}}
{{- define "moestack.databaseSecretName" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else if .Values.database.url -}}
{{- printf "%s-database" (include "moestack.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "moestack.databaseSecretKey" -}}
{{- if .Values.database.existingSecret -}}{{ .Values.database.secretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{/* Secret and key of the bundled PostgreSQL's password (generated, or existingSecret). */}}
{{- define "moestack.postgresPasswordSecretName" -}}
{{- default (printf "%s-database" (include "moestack.fullname" .)) .Values.database.postgresql.existingSecret -}}
{{- end -}}

{{- define "moestack.postgresPasswordKey" -}}
{{- if .Values.database.postgresql.existingSecret -}}{{ .Values.database.postgresql.passwordKey }}{{- else -}}password{{- end -}}
{{- end -}}

{{/* Name of the bundled PostgreSQL's Service and StatefulSet. */}}
{{- define "moestack.postgresName" -}}
{{- printf "%s-postgresql" (include "moestack.fullname" .) -}}
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
{{- if not (hasKey $gateway "ingress") -}}
{{- $_ := set $gateway "ingress" "direct" -}}
{{- end -}}
{{- $_ := set $cfg "gateway" $gateway -}}
{{- $tenancy := default (dict) $cfg.tenancy -}}
{{- if not (hasKey $tenancy "enabled") -}}
{{- $_ := set $tenancy "enabled" true -}}
{{- end -}}
{{- $_ := set $cfg "tenancy" $tenancy -}}
{{- if include "moestack.hasDatabase" . -}}
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

{{/* How requests reach the gateways (moestack.gateway.ingress; the chart's default: direct). */}}
{{- define "moestack.ingress" -}}
{{- dig "gateway" "ingress" "direct" .Values.moestack -}}
{{- end -}}

{{/* Whether the gateway replicas serve the public port themselves (direct ingress). */}}
{{- define "moestack.directIngress" -}}
{{- if eq (include "moestack.ingress" .) "direct" -}}true{{- end -}}
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
config refers to. Worker pods run only engines and get none. The bundled PostgreSQL's URL is
composed by Kubernetes from its password ($(VAR) expansion): no secret in the pod spec, and
the password may come from a Secret the chart never sees. */}}
{{- define "moestack.secretEnv" -}}
{{- with include "moestack.databaseSecretName" . }}
- name: {{ include "moestack.databaseUrlEnv" $ }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "moestack.databaseSecretKey" $ }}
{{- else }}{{ if include "moestack.bundledPostgres" . }}
{{- $db := .Values.database.postgresql.database }}
- name: MOESTACK_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "moestack.postgresPasswordSecretName" . }}
      key: {{ include "moestack.postgresPasswordKey" . }}
- name: {{ include "moestack.databaseUrlEnv" . }}
  value: {{ printf "postgresql+psycopg2://%s:$(MOESTACK_DATABASE_PASSWORD)@%s:5432/%s" $db (include "moestack.postgresName" .) $db | quote }}
{{- end }}
{{- end }}
{{- with include "moestack.adminSecretName" . }}
- name: {{ dig "tenancy" "admin_key_env" "MOESTACK_ADMIN_KEY" $.Values.moestack }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ include "moestack.adminSecretKey" $ }}
{{- end }}
{{- range .Values.overflow.providerSecrets }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- end -}}

{{/* Environment of every Ray pod, what `moestack up` sets for its own Ray
(moestack.serve.runner.serve_env): Ray Serve's throughput profile unless
moestack.ray.serve_throughput_optimized is false (THROUGHPUT_ENV), Ray's own direct ingress off
in both ingress modes (with direct ingress the gateways bind the port themselves:
moestack.serve.public_listener), and the header limits of Serve's HTTP servers
(moestack.serve.http_limits.PROXY_CALLBACK_ENV). */}}
{{- define "moestack.serveEnv" -}}
{{- if dig "ray" "serve_throughput_optimized" true .Values.moestack }}
- {name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, value: "0"}
- {name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP, value: "0"}
- {name: RAY_SERVE_USE_GRPC_BY_DEFAULT, value: "1"}
- {name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE, value: "1000"}
- {name: RAY_SERVE_FREEZE_GC_ON_STARTUP, value: "1"}
- {name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH, value: "536870912"}
{{- end }}
- {name: RAY_SERVE_ENABLE_DIRECT_INGRESS, value: "0"}
- {name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, value: "moestack.serve.http_limits:serve_http_middlewares"}
{{- end -}}

{{/* Serve variables the chart sets from moestack.gateway.ingress: head.env and
workerGroups[].env may not set them. */}}
{{- define "moestack.ingressEnvNames" -}}
RAY_SERVE_ENABLE_DIRECT_INGRESS RAY_SERVE_ENABLE_HA_PROXY RAY_SERVE_THROUGHPUT_OPTIMIZED RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT RAY_SERVE_PORT_QUARANTINE_S
{{- end -}}

{{/* Environment of every Ray container for the chart's hardening: HOME in the writable /tmp
when the root file system is read-only (vLLM, Triton, FlashInfer, Hugging Face and CUDA cache
under HOME), and vLLM refusing redirects off models[].serving.allowed_media_domains. */}}
{{- define "moestack.hardeningEnv" -}}
{{- if .Values.securityContext.readOnlyRootFilesystem }}
- {name: HOME, value: /tmp}
{{- end }}
- {name: VLLM_MEDIA_URL_ALLOW_REDIRECTS, value: "0"}
{{- end -}}

{{/* Volumes of every Ray pod: config, shared memory, /tmp (Ray's temp dir /tmp/ray and the
caches), model cache. Arg: dict root, shmSize. */}}
{{- define "moestack.volumes" -}}
{{- $root := .root -}}
- name: moestack-config
  configMap:
    name: {{ include "moestack.fullname" $root }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: tmp
  emptyDir: {}
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
    type: Directory
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- with $root.Values.adapters }}
{{- if .volume.existingClaim }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ .volume.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "moestack.volumeMounts" -}}
- name: moestack-config
  mountPath: /etc/moestack
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
  readOnly: {{ include "moestack.modelCacheReadOnly" . }}
{{- if .Values.adapters.volume.existingClaim }}
- name: adapters
  mountPath: {{ .Values.adapters.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Whether the model cache is mounted read-only: readOnly, or always for a hostPath. */}}
{{- define "moestack.modelCacheReadOnly" -}}
{{- with .Values.modelCache -}}
{{- if or .readOnly (and .hostPath (not .existingClaim) (not .create)) }}true{{ else }}false{{ end -}}
{{- end -}}
{{- end -}}

{{/* Selector (matchLabels + matchExpressions) of this release's Ray pods, head and workers.
Arg: dict root, components (list). */}}
{{- define "moestack.rayPodSelector" -}}
matchLabels:
  {{- include "moestack.selectorLabels" .root | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [{{ join ", " .components }}]}
{{- end -}}

{{/* IPv4 address a.b.c.d as an integer. */}}
{{- define "moestack.ipv4ToInt" -}}
{{- $o := splitList "." . -}}
{{- add (mul (int (index $o 0)) 16777216) (mul (int (index $o 1)) 65536) (mul (int (index $o 2)) 256) (int (index $o 3)) -}}
{{- end -}}

{{/* "true" when the IPv4 CIDR .cidr contains the IPv4 address .ip (IPv6 CIDRs: never). */}}
{{- define "moestack.cidrContains" -}}
{{- $parts := splitList "/" (toString .cidr) -}}
{{- if and (eq (len $parts) 2) (eq (len (splitList "." (index $parts 0))) 4) -}}
{{- $block := 1 -}}
{{- range until (sub 32 (int (index $parts 1)) | int) }}{{ $block = mul $block 2 }}{{ end -}}
{{- $net := include "moestack.ipv4ToInt" (index $parts 0) | int64 -}}
{{- $ip := include "moestack.ipv4ToInt" .ip | int64 -}}
{{- if eq (div $net $block) (div $ip $block) }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* `ray start` parameters as sorted "key: "value"" lines (KubeRay wants strings). */}}
{{- define "moestack.rayStartParams" -}}
{{- $lines := list -}}
{{- range $k, $v := . }}{{ $lines = append $lines (printf "%s: %s" $k ($v | toString | quote)) }}{{ end -}}
{{- join "\n" $lines -}}
{{- end -}}
