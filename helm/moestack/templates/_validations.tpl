{{/*
Fail early on values that cannot work. Included once, from rayservice.yaml.
GPU layout rules (moestack.models[] with accelerator: gpu, against workerGroups with
gpusPerWorker > 0): tensor parallelism stays inside one worker pod; a replica larger than one
worker (tensor x pipeline x data) fills whole workers, each holding whole tensor-parallel
groups; all replicas fit in the GPUs of the groups at maxReplicas.
*/}}
{{- define "moestack.validate" -}}
{{- $errors := list -}}
{{- if and .Values.kuberay.checkCRDs (not (.Capabilities.APIVersions.Has "ray.io/v1/RayService")) -}}
{{- $errors = append $errors "the cluster does not serve ray.io/v1 RayService: install the KubeRay operator first (or render offline with --api-versions ray.io/v1/RayService, or kuberay.checkCRDs=false)" -}}
{{- end -}}
{{- $maxGpw := 0 -}}
{{- $totalGpus := 0 -}}
{{- $groupNames := list -}}
{{- range $g := .Values.workerGroups -}}
{{- $gpw := int $g.gpusPerWorker -}}
{{- if gt $gpw $maxGpw }}{{ $maxGpw = $gpw }}{{ end -}}
{{- $totalGpus = add $totalGpus (mul $gpw (int $g.maxReplicas)) -}}
{{- if has $g.name $groupNames -}}
{{- $errors = append $errors (printf "workerGroups: the name %q is used twice" $g.name) -}}
{{- end -}}
{{- $groupNames = append $groupNames $g.name -}}
{{- if or (gt (int $g.minReplicas) (int $g.replicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- $errors = append $errors (printf "workerGroups[%s]: need minReplicas <= replicas <= maxReplicas (got %d, %d, %d)" $g.name (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- $neededGpus := 0 -}}
{{- range $m := .Values.moestack.models -}}
{{- if eq (default "cpu" $m.accelerator) "gpu" -}}
{{- $p := default (dict) $m.parallelism -}}
{{- $tp := int (default 1 $p.tensor_parallel_size) -}}
{{- $pp := int (default 1 $p.pipeline_parallel_size) -}}
{{- $dp := int (default 1 $p.data_parallel_size) -}}
{{- $world := mul $tp $pp $dp -}}
{{- $neededGpus = add $neededGpus (mul $world (int (default 1 $m.num_replicas))) -}}
{{- if eq $maxGpw 0 -}}
{{- $errors = append $errors (printf "model %s: accelerator is gpu but no worker group has gpusPerWorker > 0" $m.name) -}}
{{- else if gt $tp $maxGpw -}}
{{- $errors = append $errors (printf "model %s: tensor_parallel_size %d is larger than the GPUs per worker (%d); tensor parallelism must stay inside one node, use pipeline_parallel_size across nodes" $m.name $tp $maxGpw) -}}
{{- else if and (gt $world $maxGpw) (ne (mod $world $maxGpw) 0) -}}
{{- $errors = append $errors (printf "model %s: tensor x pipeline x data parallel size %d x %d x %d = %d GPUs does not fill whole workers of %d GPUs" $m.name $tp $pp $dp $world $maxGpw) -}}
{{- else if and (gt $world $maxGpw) (ne (mod $maxGpw $tp) 0) -}}
{{- $errors = append $errors (printf "model %s: a replica spans several workers of %d GPUs, which must each hold whole tensor-parallel groups of %d GPUs" $m.name $maxGpw $tp) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq (include "moestack.modelCacheReadOnly" .) "true") (not .Values.moestack.cache_dir) -}}
{{- range $m := .Values.moestack.models -}}
{{- if $m.tiny -}}
{{- $errors = append $errors (printf "model %s: a tiny model is built into the model cache, which modelCache.readOnly (or a hostPath, always read-only) makes read-only; set moestack.cache_dir elsewhere or use a writable claim" $m.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (gt $maxGpw 0) (gt $neededGpus $totalGpus) -}}
{{- $errors = append $errors (printf "the GPU models need %d GPUs (parallel size x num_replicas, summed) but the worker groups provide at most %d (gpusPerWorker x maxReplicas)" $neededGpus $totalGpus) -}}
{{- end -}}
{{- if not .Values.insecureNoAuth -}}
{{- if not (dig "tenancy" "enabled" true .Values.moestack) -}}
{{- $errors = append $errors "moestack.tenancy.enabled is false: the API would serve anyone with no key, limit, budget or ledger. Keep tenancy on, or set insecureNoAuth: true (private tests only)" -}}
{{- end -}}
{{- if not (include "moestack.hasDatabase" .) -}}
{{- $errors = append $errors "tenancy needs a database: keep database.postgresql.enabled (bundled) or set database.url / database.existingSecret (external); or set insecureNoAuth: true (private tests only)" -}}
{{- end -}}
{{- if dig "storage" "url" "" .Values.moestack -}}
{{- $errors = append $errors "moestack.storage.url would put the database URL in the rendered config: set database.url or database.existingSecret (kept in a Secret) instead" -}}
{{- end -}}
{{- end -}}
{{- $placeholders := list "change-me" "changeme" "change_me" "replace-me" "replaceme" "placeholder" "example" "your-" "xxxxxxxx" -}}
{{- with .Values.adminKey.value -}}
{{- if lt (len .) 32 -}}
{{- $errors = append $errors (printf "adminKey.value has %d characters; the gateway refuses admin keys under 32 (e.g. openssl rand -hex 32), or leave it empty to have one generated" (len .)) -}}
{{- end -}}
{{- $key := lower . -}}
{{- $found := "" -}}
{{- range $placeholders }}{{ if and (not $found) (contains . $key) }}{{ $found = . }}{{ end }}{{ end -}}
{{- if $found -}}
{{- $errors = append $errors (printf "adminKey.value looks like a placeholder (it contains %q): use a random key (openssl rand -hex 32) in adminKey.existingSecret, or leave it empty to have one generated" $found) -}}
{{- else if lt (len (uniq (splitList "" .))) 10 -}}
{{- $errors = append $errors (printf "adminKey.value looks like a placeholder (only %d different characters): use a random key (openssl rand -hex 32) in adminKey.existingSecret, or leave it empty to have one generated" (len (uniq (splitList "" .)))) -}}
{{- end -}}
{{- end -}}
{{- with .Values.database.url -}}
{{- $userinfo := regexFind "://[^/@]+@" . | trimPrefix "://" | trimSuffix "@" -}}
{{- $password := lower (join ":" (rest (splitList ":" $userinfo))) -}}
{{- range $placeholders -}}
{{- if and $password (contains . $password) -}}
{{- $errors = append $errors (printf "database.url has a placeholder password (it contains %q): put the real URL in a Secret and name it in database.existingSecret" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.gitops -}}
{{- if and .Values.adminKey.generate (not .Values.adminKey.existingSecret) (not .Values.adminKey.value) -}}
{{- $errors = append $errors "gitops: the chart would generate a new admin key on every render (helm template cannot look up the one in the cluster): create a Secret and set adminKey.existingSecret, or adminKey.generate false" -}}
{{- end -}}
{{- if and (include "moestack.bundledPostgres" .) (not .Values.database.postgresql.existingSecret) -}}
{{- $errors = append $errors "gitops: the chart would generate a new PostgreSQL password on every render (helm template cannot look up the one in the cluster), locking the gateway out of its database: create a Secret with the password and set database.postgresql.existingSecret" -}}
{{- end -}}
{{- end -}}
{{- $operatorPort := include "moestack.operatorPort" . | int -}}
{{- $operatorEnd := add $operatorPort (include "moestack.operatorPortCount" . | int) -}}
{{- range $name, $port := dict "the gateway port (moestack.gateway.port)" (include "moestack.gatewayPort" . | int) "monitoring.rayMetricsPort" (int .Values.monitoring.rayMetricsPort) "the Ray dashboard port" 8265 "the Ray agent port" 52365 "the Ray GCS port" 6379 "the Ray client port" 10001 -}}
{{- if and (ge (int $port) $operatorPort) (lt (int $port) $operatorEnd) -}}
{{- $errors = append $errors (printf "the operator ports %d-%d (moestack.gateway.operator_port, one per gateway replica) overlap %s, %d" $operatorPort (sub $operatorEnd 1) $name (int $port)) -}}
{{- end -}}
{{- end -}}
{{- $np := .Values.networkPolicy -}}
{{- if not $np.enabled -}}
{{- if not .Values.insecureNoNetworkPolicy -}}
{{- $errors = append $errors "networkPolicy.enabled is false: every pod that reaches the Ray pods could submit Ray jobs through the dashboard (code execution next to the admin key and database URL), reach GCS and the engines, and the engines could reach any address. Keep it on, or set insecureNoNetworkPolicy: true (private tests only)" -}}
{{- end -}}
{{- else -}}
{{- if or (not $np.kuberayOperator.namespace) (not $np.kuberayOperator.podLabels) -}}
{{- $errors = append $errors "networkPolicy.kuberayOperator needs both namespace and podLabels: the Ray dashboard (Jobs API) opens only to the operator's pods in the operator's namespace" -}}
{{- end -}}
{{- if not $np.dnsTo -}}
{{- $errors = append $errors "networkPolicy.dnsTo is empty: name the cluster DNS pods (an empty list would open the DNS port to every address)" -}}
{{- end -}}
{{- if and (include "moestack.hasDatabase" .) (not (include "moestack.bundledPostgres" .)) (not $np.databaseCIDR) (not $np.databaseTo) -}}
{{- $errors = append $errors "networkPolicy: the head pods could not reach the external database: set networkPolicy.databaseCIDR (a database outside the cluster) or networkPolicy.databaseTo (peers inside it), and databasePort" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not $np.apiServerCIDRs) -}}
{{- $errors = append $errors "networkPolicy: autoscaling runs KubeRay's autoscaler in the head pod, which calls the Kubernetes API: set networkPolicy.apiServerCIDRs to the API server's addresses (kubectl get endpoints kubernetes -n default)" -}}
{{- end -}}
{{- if not $np.allowMetadataEgress -}}
{{- $metadata := "169.254.169.254" -}}
{{- $rules := list -}}
{{- range $i, $rule := $np.extraEgress -}}
{{- if not $rule.to -}}
{{- $errors = append $errors (printf "networkPolicy.extraEgress[%d] has no `to`: it would open every address, the cloud metadata address %s included; name the destinations (for the internet: ipBlock 0.0.0.0/0 with except [169.254.0.0/16])" $i $metadata) -}}
{{- end -}}
{{- $rules = append $rules (dict "name" (printf "networkPolicy.extraEgress[%d]" $i) "to" $rule.to) -}}
{{- end -}}
{{- with .Values.overflow.egressTo -}}
{{- $rules = append $rules (dict "name" "overflow.egressTo" "to" .) -}}
{{- end -}}
{{- range $rule := $rules -}}
{{- range $peer := $rule.to -}}
{{- with $peer.ipBlock -}}
{{- if include "moestack.cidrContains" (dict "cidr" .cidr "ip" $metadata) -}}
{{- $excepted := "" -}}
{{- range .except }}{{ if include "moestack.cidrContains" (dict "cidr" . "ip" $metadata) }}{{ $excepted = "true" }}{{ end }}{{ end -}}
{{- if not $excepted -}}
{{- $errors = append $errors (printf "%s: ipBlock %s covers the cloud metadata address %s: add 169.254.0.0/16 to its except, or set networkPolicy.allowMetadataEgress" $rule.name .cidr $metadata) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $ingress := include "moestack.ingress" . -}}
{{- $proxyLocation := .Values.serve.proxyLocation -}}
{{- if and (eq $ingress "direct") (ne $proxyLocation "Disabled") -}}
{{- $errors = append $errors (printf "moestack.gateway.ingress is direct (the gateways serve the public port themselves) but serve.proxyLocation is %s: Serve's proxies would share the port with them; set serve.proxyLocation: Disabled (or moestack.gateway.ingress: proxy, slower)" $proxyLocation) -}}
{{- end -}}
{{- if and (eq $ingress "proxy") (eq $proxyLocation "Disabled") -}}
{{- $errors = append $errors "moestack.gateway.ingress is proxy but serve.proxyLocation is Disabled: nothing would serve the public port; set serve.proxyLocation: EveryNode or HeadOnly (or moestack.gateway.ingress: direct, the fast path)" -}}
{{- end -}}
{{- $ingressEnv := splitList " " (include "moestack.ingressEnvNames" .) -}}
{{- $envs := dict "head.env" .Values.head.env -}}
{{- range $g := .Values.workerGroups }}{{ $_ := set $envs (printf "workerGroups[%s].env" $g.name) $g.env }}{{ end -}}
{{- range $where, $env := $envs -}}
{{- range $e := $env -}}
{{- if has $e.name $ingressEnv -}}
{{- $errors = append $errors (printf "%s sets %s: the chart sets Serve's ingress from moestack.gateway.ingress (direct: the gateways bind the public port with SO_REUSEPORT and Ray's own direct ingress stays off; its per-replica port pool and port quarantine would leave a dead gateway's successor without the port)" $where $e.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) -}}
{{- $errors = append $errors "ingress.enabled needs at least one entry in ingress.hosts" -}}
{{- end -}}
{{- if and .Values.adapters.volume.existingClaim (eq (clean .Values.adapters.mountPath) (clean .Values.modelCache.mountPath)) -}}
{{- $errors = append $errors "adapters.mountPath: must differ from modelCache.mountPath (both volumes are mounted)" -}}
{{- end -}}
{{- if and .Values.modelCache.create .Values.modelCache.existingClaim -}}
{{- $errors = append $errors "modelCache: set either existingClaim or create, not both" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nmoestack chart: invalid values:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
