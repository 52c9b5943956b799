{{/* Pieces shared by the head and worker pod templates. */}}

{{- define "alignedserve.rayEnv" -}}
env:
  # ServeConfig reads ALIGNEDSERVE_* once, when the app is built (alignedserve/config.py).
  {{- if .Values.redis.enabled }}
  - name: REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "alignedserve.redisPasswordSecret" . }}
        key: password
  - name: ALIGNEDSERVE_REDIS_URL
    value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis.%s.svc:6379/0" (include "alignedserve.fullname" .) .Release.Namespace | quote }}
  {{- else }}
  - name: ALIGNEDSERVE_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "alignedserve.redisUrlSecret" . }}
        key: {{ include "alignedserve.redisUrlKey" . }}
  {{- end }}
  {{- with .Values.apiKey.existingSecret }}
  - name: ALIGNEDSERVE_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.apiKey.secretKey }}
  {{- end }}
  # Serve's controller reconciles every 0.5 s instead of 0.1 s: less CPU beside the model
  # (deployments/app.py, SERVE_LOOP_S).
  - name: RAY_SERVE_CONTROL_LOOP_INTERVAL_S
    value: "0.5"
  - name: HF_HUB_OFFLINE
    value: "1"
  - name: TOKENIZERS_PARALLELISM
    value: "false"
{{- end -}}

{{- define "alignedserve.modelMount" -}}
{{- if .Values.modelStorage.existingClaim -}}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "alignedserve.modelVolume" -}}
{{- if .Values.modelStorage.existingClaim -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.modelStorage.existingClaim }}
    readOnly: true
{{- end -}}
{{- end -}}

{{/* nodeSelector, tolerations, affinity of one pod group (its values block). */}}
{{- define "alignedserve.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
