{{/* Names. The RayService takes the full name, which KubeRay caps at 47 characters. */}}
{{- define "alignedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "alignedserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "alignedserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels every object carries; selectors use the selector labels plus a component. */}}
{{- define "alignedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "alignedserve.labels" -}}
{{ include "alignedserve.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Serve app's args: the serveConfig values plus the fields the chart manages. The
Redis URL is not among them: it reaches Ray containers only as ALIGNEDSERVE_REDIS_URL. */}}
{{- define "alignedserve.serveArgs" -}}
{{- $args := deepCopy .Values.serveConfig -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ = set $args "http_port" (int .Values.ports.http) -}}
{{- $_ = set $args "grpc_port" (int .Values.ports.grpc) -}}
{{- $_ = set $args "kv_grpc_port" (int .Values.ports.kvStore) -}}
{{- $_ = set $args "proxy_location" "EveryNode" -}}
{{- $_ = set $args "ingress" "proxy" -}}
{{- $_ = set $args "start_redis" false -}}
{{- toYaml $args -}}
{{- end -}}

{{/* Compute replicas per worker pod, rounded up (Ray may pack them unevenly; the /dev/shm
size covers the rounded-up share). */}}
{{- define "alignedserve.replicasPerPod" -}}
{{- $n := int .Values.serveConfig.num_replicas -}}
{{- $pods := int .Values.rayWorker.replicas -}}
{{- div (add $n $pods -1) $pods -}}
{{- end -}}

{{/* /dev/shm of a worker pod in MiB: the node's host KV pool + the device KV pools of its
compute replicas (shared memory on CPU nodes) + Ray's object store + headroom. */}}
{{- define "alignedserve.workerShmMiB" -}}
{{- $v := .Values -}}
{{- $gib := addf $v.serveConfig.host_kv_gib (mulf (include "alignedserve.replicasPerPod" . | atoi) $v.serveConfig.engine.kv_cache_gib) $v.rayWorker.objectStoreGiB $v.rayWorker.shmHeadroomGiB -}}
{{- mulf $gib 1024 | ceil | int -}}
{{- end -}}

{{- define "alignedserve.headShmMiB" -}}
{{- addf .Values.rayHead.objectStoreGiB 0.25 | mulf 1024 | ceil | int -}}
{{- end -}}

{{/* preStop sleep and grace period, both longer than the drain. */}}
{{- define "alignedserve.preStopSeconds" -}}
{{- add (.Values.serveConfig.drain_timeout_s | ceil | int) .Values.rayWorker.drainMarginSeconds -}}
{{- end -}}

{{- define "alignedserve.gracePeriodSeconds" -}}
{{- add (include "alignedserve.preStopSeconds" . | atoi) .Values.rayWorker.drainMarginSeconds -}}
{{- end -}}

{{/* Secret and key holding an external Redis URL. */}}
{{- define "alignedserve.redisUrlSecret" -}}
{{- if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- printf "%s-redis-url" (include "alignedserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "alignedserve.redisUrlKey" -}}
{{- if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{- define "alignedserve.redisPasswordSecret" -}}
{{- default (printf "%s-redis" (include "alignedserve.fullname" .)) .Values.redis.existingPasswordSecret -}}
{{- end -}}

{{/* Fails the render on settings that pass the schema but cannot work together. */}}
{{- define "alignedserve.validate" -}}
{{- $v := .Values -}}
{{- if and (not $v.redis.enabled) (not $v.redis.external.url) (not $v.redis.external.existingSecret) -}}
{{- fail "redis.enabled is false: set redis.external.url or redis.external.existingSecret" -}}
{{- end -}}
{{- $need := mulf $v.serveConfig.num_replicas (addf $v.serveConfig.replica_gpus $v.serveConfig.worker_gpus) -}}
{{- $have := mul $v.rayWorker.replicas $v.rayWorker.gpus -}}
{{- if gt $need (float64 $have) -}}
{{- fail (printf "GPUs: num_replicas * (replica_gpus + worker_gpus) = %v, but rayWorker.replicas * rayWorker.gpus = %v" $need $have) -}}
{{- end -}}
{{- $shm := include "alignedserve.workerShmMiB" . | atoi -}}
{{- if ge $shm (mulf $v.rayWorker.memoryGiB 1024 | int) -}}
{{- fail (printf "rayWorker.memoryGiB (%v GiB) must exceed the worker's /dev/shm (%d MiB: host_kv_gib + device KV pools + object store + headroom)" $v.rayWorker.memoryGiB $shm) -}}
{{- end -}}
{{- end -}}
