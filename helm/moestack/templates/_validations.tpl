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
{{- if and .Values.modelCache.readOnly (not .Values.moestack.cache_dir) -}}
{{- range $m := .Values.moestack.models -}}
{{- if $m.tiny -}}
{{- $errors = append $errors (printf "model %s: a tiny model is built into the model cache, which modelCache.readOnly makes read-only; set moestack.cache_dir elsewhere or readOnly false" $m.name) -}}
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
{{- if not (include "moestack.databaseSecretName" .) -}}
{{- $errors = append $errors "tenancy needs a database: keep database.postgresql.enabled (bundled) or set database.url / database.existingSecret (external); or set insecureNoAuth: true (private tests only)" -}}
{{- end -}}
{{- if dig "storage" "url" "" .Values.moestack -}}
{{- $errors = append $errors "moestack.storage.url would put the database URL in the rendered config: set database.url or database.existingSecret (kept in a Secret) instead" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.adminKey.value (lt (len .Values.adminKey.value) 32) -}}
{{- $errors = append $errors (printf "adminKey.value has %d characters; the gateway refuses admin keys under 32 (e.g. openssl rand -hex 32), or leave it empty to have one generated" (len .Values.adminKey.value)) -}}
{{- end -}}
{{- $operatorPort := include "moestack.operatorPort" . | int -}}
{{- $operatorEnd := add $operatorPort (include "moestack.operatorPortCount" . | int) -}}
{{- range $name, $port := dict "the gateway port (moestack.gateway.port)" (include "moestack.gatewayPort" . | int) "monitoring.rayMetricsPort" (int .Values.monitoring.rayMetricsPort) "the Ray dashboard port" 8265 "the Ray agent port" 52365 "the Ray GCS port" 6379 "the Ray client port" 10001 -}}
{{- if and (ge (int $port) $operatorPort) (lt (int $port) $operatorEnd) -}}
{{- $errors = append $errors (printf "the operator ports %d-%d (moestack.gateway.operator_port, one per gateway replica) overlap %s, %d" $operatorPort (sub $operatorEnd 1) $name (int $port)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.operatorFrom) -}}
{{- $errors = append $errors "networkPolicy.operatorFrom is empty: name the KubeRay operator's pods (an empty list would open the Ray dashboard to every pod)" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) -}}
{{- $errors = append $errors "ingress.enabled needs at least one entry in ingress.hosts" -}}
{{- end -}}
{{- if and .Values.modelCache.create .Values.modelCache.existingClaim -}}
{{- $errors = append $errors "modelCache: set either existingClaim or create, not both" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nmoestack chart: invalid values:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
